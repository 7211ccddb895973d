"""BolmoTokenizer: UTF-8 bytes <-> byte ids (pad 0, bos = eos 1, 2, end-of-patch 3, byte b -> b + 4).

Needs no hub and no vocabulary file: the 260 ids are fixed. Fused ids (>= 260, the model's
"closes a patch" flag) decode like the plain byte. Text that is not valid UTF-8 on decode is
shown with U+FFFD; token strings are "<0xNN>" per byte.
"""

from transformers import PreTrainedTokenizer

SPECIALS = ["<pad>", "<bos>", "<eos>", "<bpe_token_end>"]
OFFSET, FLAG = 4, 260


class BolmoTokenizer(PreTrainedTokenizer):
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, pad_token="<pad>", bos_token="<bos>", eos_token="<bos>", add_bos_token=True, **kwargs):
        self.add_bos_token = add_bos_token
        self._vocab = {t: i for i, t in enumerate(SPECIALS)}
        self._vocab.update({f"<0x{b:02X}>": b + OFFSET for b in range(256)})
        self._inv = {i: t for t, i in self._vocab.items()}
        super().__init__(
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos_token=add_bos_token,
            **kwargs,
        )

    @property
    def vocab_size(self):
        return FLAG

    def get_vocab(self):
        return dict(self._vocab)

    def _tokenize(self, text, **kwargs):
        return [f"<0x{b:02X}>" for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return self._inv.get(index - FLAG if index >= FLAG else index, "<pad>")

    def convert_tokens_to_string(self, tokens):
        data = bytes(int(t[3:5], 16) for t in tokens if t.startswith("<0x") and len(t) == 6)
        return data.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        out = bos + token_ids_0
        return out if token_ids_1 is None else out + bos + token_ids_1

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [1 if i < OFFSET else 0 for i in token_ids_0]
        bos = [1] if self.add_bos_token else []
        out = bos + [0] * len(token_ids_0)
        return out if token_ids_1 is None else out + bos + [0] * len(token_ids_1)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()  # the vocabulary is fixed by the byte layout: nothing to save
