"""Examples (lists of Text / Image segments) <-> a packed ``Batch`` of flat tensors (DESIGN §4).

A document is laid out as ``BOS, seg_1, ..., seg_k, EOS`` where a text segment contributes its ids and
an image segment ``BOI, p_1 ... p_n, EOI`` (n = patches of its own latent: images of different sizes and
aspect ratios share a batch; their patches are packed flat, image after image, in sequence order, and
each image's latent shape rides along in ``Batch.image_shape``). Documents are packed greedily
into rows of ``seq_len``; RoPE positions restart in every document and the mask keeps documents
apart, so where a document lands never changes its outputs (tested; MoE-4x's expert choice routes
within each document, so it holds there too).

Text targets: position i predicts token i+1 when both are text of the same document. So the LM learns
to emit BOI (start an image) and, after EOI, to continue the text; it never predicts patches, and EOI
is appended by the sampler after the last patch.

Discrete images (``ImageTokens``, the Chameleon setting) are ``BOI, id_1 ... id_n, EOI`` with the ids in
the codebook's own id space at IMAGE positions, causal (no image id: the mask is the text mask), and
predicted like text: position i predicts token i+1 whenever both are discrete tokens of the same
document, so BOI predicts the first code, the last code predicts EOI. ``text_targets`` then holds each
target in its own modality's id space; the modality of position i+1 says which head predicts it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.inputs import IMAGE, TEXT, ModelInput
from ..model.layers import patchify_each, unpatchify_each
from .segments import Continuous, Image, ImageTokens, Text

IGNORE = -100
SPAN_BASE = 1 << 40  # span ids of plug-in continuous segments (image ids stay below: they index the images)


@dataclass(frozen=True)
class Specials:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    vocab: int = 0  # the tokenizer's ids are 0..vocab-1; sampling never emits the LM head's padding rows above

    @classmethod
    def of(cls, tokenizer) -> "Specials":
        return cls(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.boi_id, tokenizer.eoi_id,
                   tokenizer.vocab_size)


@dataclass(kw_only=True)
class Batch(ModelInput):
    """The network's input (``model.inputs.ModelInput``) plus what only training reads."""

    text_targets: torch.Tensor  # (B, T) next text token, IGNORE where there is no LM loss
    conditions_text: torch.Tensor  # (N,) bool: image precedes text in its document (captioning)
    image_seed: torch.Tensor  # (N,) seed of each image's t and noise: same data -> same noise anywhere
    # plug-in modality m -> (S_m, 3) long: (length, example key, index in the example) of each of its spans, in
    # the order of values[m]; the key and index seed the span's t and noise (same example -> same noise anywhere)
    value_spans: dict[int, torch.Tensor] = field(default_factory=dict)

    def flow_elements(self) -> int:
        """Elements under the flow loss: every latent patch element and every plug-in value."""
        return self.patches.numel() + sum(v.numel() for v in self.values.values())

    def latents(self) -> list[torch.Tensor]:
        """The images' clean latents (C, h, w), each at its own size (inspection, tests)."""
        return unpatchify_each(self.patches, self.image_shape.cpu(), self.patch_size) if self.n_images else []


def image_patches(image: Image, patch_size: int) -> int:
    """Patches of one image's own latent (C, h, w)."""
    return (image.latent.shape[-2] // patch_size) * (image.latent.shape[-1] // patch_size)


def document_length(example: list, *, patch_size: int) -> int:
    """Tokens a document takes: BOS + EOS + text ids + (BOI + patches + EOI) per image, each image's patch
    count from its own latent."""
    return 2 + sum(len(s.ids) if isinstance(s, Text) else s.ids.numel() + 2 if isinstance(s, ImageTokens)
                   else s.values.shape[0] + 2 if isinstance(s, Continuous)
                   else image_patches(s, patch_size) + 2 for s in example)


def _doc_tokens(example: list, sp: Specials, patch_size: int,
                extra: tuple = ()) -> tuple[list[int], list[int], list[int], list[bool]]:
    """Token ids, modality, local image index (-1 off continuous images) and whether each position is a
    discrete token (text, markers, image codes: next-token targets) for one document."""
    toks, mods, imgs, discrete = [sp.bos], [TEXT], [-1], [True]
    n_img = n_span = 0
    for seg in example:
        if isinstance(seg, Text):
            toks += seg.ids
            mods += [TEXT] * len(seg.ids)
            imgs += [-1] * len(seg.ids)
            discrete += [True] * len(seg.ids)
        elif isinstance(seg, Image):
            n_patches = image_patches(seg, patch_size)
            toks += [sp.boi] + [sp.pad] * n_patches + [sp.eoi]
            mods += [TEXT] + [IMAGE] * n_patches + [TEXT]
            imgs += [-1] + [n_img] * n_patches + [-1]
            discrete += [True] + [False] * n_patches + [True]
            n_img += 1
        elif isinstance(seg, ImageTokens):
            n = seg.ids.numel()
            toks += [sp.boi] + seg.ids.reshape(-1).tolist() + [sp.eoi]
            mods += [TEXT] + [IMAGE] * n + [TEXT]
            imgs += [-1] * (n + 2)
            discrete += [True] * (n + 2)
        elif isinstance(seg, Continuous):  # plug-in span: local ids -2, -3, ... (pack maps them to SPAN_BASE + k)
            if seg.modality not in extra:
                raise ValueError(f"a {type(seg).__name__} segment of modality {seg.modality!r} needs it in "
                                 f"model.extra_modalities (now {list(extra)})")
            n = seg.values.shape[0]
            toks += [sp.boi] + [sp.pad] * n + [sp.eoi]
            mods += [TEXT] + [2 + extra.index(seg.modality)] * n + [TEXT]
            imgs += [-1] + [-2 - n_span] * n + [-1]
            discrete += [True] + [False] * n + [True]
            n_span += 1
        else:
            raise TypeError(f"segments must be Text, Image, ImageTokens or Continuous, got {type(seg).__name__}")
    return toks + [sp.eos], mods + [TEXT], imgs + [-1], discrete + [True]


def pack(examples: list[list], seq_len: int, specials: Specials, patch_size: int,
         n_rows: int | None = None, image_seeds: list[list[int]] | None = None,
         extra_modalities: tuple = (), example_keys: list[int] | None = None) -> Batch:
    """Greedy packing in order: a document goes into the current row if it fits, else opens a new row.

    ``n_rows`` pads the batch with empty rows to a fixed count (an error if the documents need more).
    ``image_seeds[i][j]`` seeds the t / noise of image j of example i (default: running index).
    ``extra_modalities`` (``model.extra_modalities``) gives plug-in ``Continuous`` segments their ids 2, 3, ...;
    their spans' t / noise are seeded by ``(example_keys[i], j)`` for the j-th plug-in segment of example i
    (``example_keys``: the examples' data positions; default: their index in ``examples``).
    """
    if not examples:
        raise ValueError("pack() needs at least one example")
    _check_latents(examples, patch_size)
    rows: list[list[int]] = [[]]
    used = 0
    for i, ex in enumerate(examples):
        length = document_length(ex, patch_size=patch_size)
        if length > seq_len:
            raise ValueError(f"example {i} needs {length} tokens but data.seq_len={seq_len}; "
                             f"shorten its text (data.max_caption_tokens) or raise seq_len")
        if used + length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += length
    n_rows = n_rows or len(rows)
    if len(rows) > n_rows:
        raise ValueError(f"{len(examples)} examples need {len(rows)} rows of {seq_len} tokens, only {n_rows} allowed")

    shape = (n_rows, seq_len)
    tokens = torch.full(shape, specials.pad, dtype=torch.long)
    modality = torch.zeros(shape, dtype=torch.long)
    doc_id = torch.full(shape, -1, dtype=torch.long)
    image_id = torch.full(shape, -1, dtype=torch.long)
    position = torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    latents, cond, seeds, doc = [], [], [], 0
    extra = tuple(extra_modalities)  # modality 2 + k is extra[k]
    values: dict[int, list[torch.Tensor]] = {2 + k: [] for k in range(len(extra))}
    span_keys: dict[int, list[tuple[int, int]]] = {m: [] for m in values}  # (example key, index in the example)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            toks, mods, imgs, discrete = _doc_tokens(examples[i], specials, patch_size, extra)
            n = len(toks)
            span = slice(col, col + n)
            tokens[r, span] = torch.tensor(toks)
            modality[r, span] = torch.tensor(mods)
            doc_id[r, span] = doc
            position[r, span] = torch.arange(n)
            base, n_spans = len(latents), sum(len(v) for v in values.values())
            image_id[r, span] = torch.tensor([base + j if j >= 0 else -1 if j == -1 else SPAN_BASE + n_spans - 2 - j
                                              for j in imgs])
            is_discrete = torch.tensor(discrete)
            nxt = torch.tensor(toks[1:])
            ok = is_discrete[:-1] & is_discrete[1:]
            targets[r, col:col + n - 1] = torch.where(ok, nxt, torch.full_like(nxt, IGNORE))
            j = 0
            for k, seg in enumerate(examples[i]):
                if isinstance(seg, Image):
                    latents.append(seg.latent)
                    later_text = any(isinstance(s, Text) and s.ids for s in examples[i][k + 1:])
                    cond.append(seg.conditions_text or later_text)
                    seeds.append(image_seeds[i][j] if image_seeds is not None else len(seeds))
                    j += 1
            for k, seg in enumerate(s for s in examples[i] if isinstance(s, Continuous)):  # plug-in spans, in order
                m = 2 + extra.index(seg.modality)
                values[m].append(seg.values.float())
                span_keys[m].append((example_keys[i] if example_keys is not None else i, k))
            doc += 1
            col += n
    if latents:
        patches, image_shape = patchify_each([x.float() for x in latents], patch_size)
    else:
        patches, image_shape = torch.zeros(0, patch_size ** 2), torch.zeros(0, 3, dtype=torch.long)
    return Batch(tokens=tokens, modality=modality, doc_id=doc_id, image_id=image_id, position=position,
                 patches=patches, image_shape=image_shape, t=torch.zeros(len(latents)), text_targets=targets,
                 conditions_text=torch.tensor(cond, dtype=torch.bool),
                 image_seed=torch.tensor(seeds, dtype=torch.long), **_flat_values(values, span_keys))


def _check_latents(examples: list[list], patch_size: int) -> None:
    for i, ex in enumerate(examples):
        for seg in ex:
            if isinstance(seg, Image) and (seg.latent.dim() != 3 or seg.latent.shape[-2] % patch_size
                                           or seg.latent.shape[-1] % patch_size):
                raise ValueError(f"example {i}: an image latent must be (C, h, w) with h and w multiples of "
                                 f"model.patch_size={patch_size}, got {tuple(seg.latent.shape)}")


def _flat_values(values: dict[int, list[torch.Tensor]], keys: dict[int, list[tuple[int, int]]]) -> dict:
    """Plug-in spans per modality -> Batch's ``values`` (N_m, d), zero ``time`` (N_m,) and ``value_spans``
    (S_m, 3) = (length, example key, index in the example)."""
    out: dict = {"values": {}, "time": {}, "value_spans": {}}
    for m, spans in values.items():
        if spans:
            flat = torch.cat(spans)
            lengths = torch.tensor([x.shape[0] for x in spans], dtype=torch.long)
            out["values"][m], out["time"][m] = flat, torch.zeros(flat.shape[0])
            out["value_spans"][m] = torch.cat([lengths[:, None], torch.tensor(keys[m], dtype=torch.long)], 1)
    return out


def unpack(batch: Batch, specials: Specials) -> list[list]:
    """Inverse of ``pack`` (for tests and inspection): the documents' segments in batch order."""
    examples, latents = [], batch.latents()
    for r in range(batch.tokens.shape[0]):
        docs = batch.doc_id[r]
        for d in docs[docs >= 0].unique(sorted=True).tolist():
            cols = (docs == d).nonzero().squeeze(1)
            toks = batch.tokens[r, cols].tolist()[1:-1]  # drop BOS / EOS
            imgs = batch.image_id[r, cols].tolist()[1:-1]
            mods = batch.modality[r, cols].tolist()[1:-1]
            segs, text, k = [], [], 0
            while k < len(toks):
                if toks[k] == specials.boi and k + 1 < len(imgs) and imgs[k + 1] < 0 and mods[k + 1] == IMAGE:
                    if text:
                        segs.append(Text(text))
                        text = []
                    end = k + 1
                    while end < len(mods) and mods[end] == IMAGE:
                        end += 1
                    ids = torch.tensor(toks[k + 1:end])
                    side = int(round(ids.numel() ** 0.5))  # the grid is not packed: square when it can be
                    segs.append(ImageTokens(ids.reshape(side, side) if side * side == ids.numel() else ids[None]))
                    k = end + 1  # past EOI
                elif toks[k] == specials.boi and k + 1 < len(imgs) and 0 <= imgs[k + 1] < SPAN_BASE:
                    if text:
                        segs.append(Text(text))
                        text = []
                    img = imgs[k + 1]
                    segs.append(Image(latents[img]))
                    k += 1
                    while k < len(imgs) and imgs[k] == img:
                        k += 1
                    k += 1  # EOI
                else:
                    text.append(toks[k])
                    k += 1
            if text:
                segs.append(Text(text))
            examples.append(segs)
    return examples
