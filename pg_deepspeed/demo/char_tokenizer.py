"""A character-level tokenizer built locally, for the tiny preset models used by demos and tests.

Vocabulary: the special tokens ``<pad> <bos> <eos> <unk>`` (ids 0-3), then ``"\\n"``, then printable ASCII
(``" "`` to ``"~"``): 100 tokens. Every character is one token and decoding concatenates them, so
``decode(encode(s)) == s`` for any text made of those characters. No template or special token is added on
encode; callers append ``eos_token`` themselves.
"""
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS = ("\n",) + tuple(chr(c) for c in range(32, 127))
VOCAB = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
VOCAB_SIZE = len(VOCAB)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIAL_TOKENS)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer: one token per character, unknown characters map to ``<unk>``."""
    backend = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
    )
