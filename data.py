"""What a batch is, for both stages of LLM2VEC4CXR / LLM2CLIP4CXR (Ko et al. 2025, arXiv 2509.15234).

Read in this order:
1. Reports for a config: `load_reports` splits the configured source into train / val / test by a
   hash of the study id, and drops the val / test reports whose text occurs in training (readers and
   the labeler: reports.py; synthetic studies: synthetic.py).
2. Tokens: LLM2Vec's instruction encoding, where only the report's tokens are pooled
   (arXiv 2404.05961, sec. 2.1; `encode_batch`).
3. MNTP batches: 20 % of the tokens masked, 80/10/10 (LLM2Vec sec. 2.1, after BERT, arXiv 1810.04805,
   sec. 3.1; `MNTPCollator`, `MNTPBatches`).
4. Contrastive batches: clinically equivalent variants of each report as positives (variants.py),
   error-injected copies as hard negatives, findings -> impression pairs, and one group id per report
   so that identical reports are never each other's negatives (SupCon, Khosla et al. 2020,
   arXiv 2004.11362; `ContrastiveBatches`).
5. Images and CLIP pairs (stage 2): image loading, random-resized crops, image-report datasets and
   `PairBatches`.

Every batch builder is a dataset whose item i is batch i, a pure function of (seed, epoch, i): a run
resumes exactly and gives the same batches with any number of DataLoader workers.
"""
import hashlib
import math
import random

import numpy as np
import torch
from PIL import Image

import synthetic
from reports import Report, abbreviate, normalize_for_match, normalize_report, sentences, split_of
from reports import read_chexpert_plus, read_mimic, openi_archive_path, read_openi, read_pairs
from variants import ERROR_KINDS, inject_error, make_variants, reword, unseen_edits


# ---------------------------------------------------------------------------------------------
# 1. Reports for a config
# ---------------------------------------------------------------------------------------------

def load_reports(cfg):
    """{'train' | 'val' | 'test': [Report]} for the configured source, split by study id, val and test without
    the reports that occur in training (drop_train_overlap); and 'overlap': how many were dropped."""
    d = cfg.data
    if d.source == "synthetic":  # each style describes the same studies, in its own words
        n = {"train": d.synthetic_n, "val": int(d.synthetic_n * d.val_fraction), "test": int(d.synthetic_n * d.test_fraction)}
        styles = {"train": d.train_styles, "val": d.test_styles, "test": d.test_styles}
        return drop_train_overlap({s: [r for style in styles[s]
                                       for r in synthetic.synth_reports(cfg.seed, n[s] // len(styles[s]), style, s)]
                                   for s in n})
    readers = {"openi": lambda: read_openi(d.path or openi_archive_path()),
               "mimic": lambda: read_mimic(d.path), "chexpert_plus": lambda: read_chexpert_plus(d.path, d.image_root),
               "pairs": lambda: read_pairs(d.path)}
    if d.source not in readers:
        raise ValueError(f"unknown data.source {d.source!r}; choose from {sorted(readers) + ['synthetic']}")
    splits = {"train": [], "val": [], "test": []}
    for r in readers[d.source]():
        if r.findings or r.impression:
            splits[split_of(r.study_id, d.val_fraction, d.test_fraction)].append(r)
    return drop_train_overlap(splits)


def drop_train_overlap(splits):
    """Val and test without the reports whose normalised text, or (findings, impression) pair, occurs in
    the training split: an encoder trained on a report would be graded on memory there, not on
    understanding (many reports are one of a few normal texts: on Open-I, 95 of 379 test reports
    equal a training report). Adds 'overlap': {split: {'dropped': n, 'of': n before}}, and prints it."""
    key = lambda r: normalize_for_match(r.text())
    pair = lambda r: (normalize_for_match(r.findings), normalize_for_match(r.impression))
    seen_texts = {key(r) for r in splits["train"]}
    seen_pairs = {pair(r) for r in splits["train"] if r.findings and r.impression}
    overlap = {}
    for split in ("val", "test"):
        kept = [r for r in splits[split] if key(r) not in seen_texts
                and not (r.findings and r.impression and pair(r) in seen_pairs)]
        overlap[split] = {"dropped": len(splits[split]) - len(kept), "of": len(splits[split])}
        splits[split] = kept
    print("reports whose text occurs in training, dropped: "
          + ", ".join(f"{split} {o['dropped']} of {o['of']}" for split, o in overlap.items()))
    return splits | {"overlap": overlap}


# ---------------------------------------------------------------------------------------------
# 2. Tokens: [BOS] instruction report [EOS]
# ---------------------------------------------------------------------------------------------


def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer's post-processor puts around a text: ([BOS], [EOS]), ([BOS], []), ..."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    i = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
    return full[:i], full[i + len(plain):]


def encode_batch(tokenizer, texts, max_len: int, pad_id: int, instruction=None,
                 padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Tokenise reports, optionally behind an LLM2Vec instruction: [BOS] instruction report [EOS].
    LLM2Vec writes "instruction !@#$%^&*()report" only to find where the report starts, and removes the
    separator before tokenising (its `tokenize`); here instruction and report are tokenised apart and
    their ids joined, so the boundary is exact without any separator, and the report's tokens are the
    same with or without an instruction. embed_mask, what pooling averages, is 1 on the report and the
    closing special token only (without instruction it equals attention_mask). The report is truncated
    to fit max_len, never the instruction. `instruction`: one string or one per text.
    Returns (B, T) LongTensors input_ids, attention_mask, embed_mask."""
    assert padding_side in ("left", "right")
    instructions = list(instruction) if isinstance(instruction, (list, tuple)) else [instruction] * len(texts)
    head, tail = _special_wrap(tokenizer)
    bodies = [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    prefixes = [e.ids for e in tokenizer.encode_batch([i.strip() if i else "" for i in instructions],
                                                      add_special_tokens=False)]
    rows, embed = [], []
    for prefix, body in zip(prefixes, bodies):
        room = max_len - len(head) - len(prefix) - len(tail)
        if room < 1:
            raise ValueError(f"instruction of {len(prefix)} tokens leaves no room for the report in max_len={max_len}")
        rows.append(head + prefix + body[:room] + tail)
        n_skip = len(head) + len(prefix) if prefix else 0
        embed.append([0] * n_skip + [1] * (len(rows[-1]) - n_skip))
    T = max(map(len, rows))

    def pad(row, fill):  # to the longest row, on padding_side
        return [fill] * (T - len(row)) + row if padding_side == "left" else row + [fill] * (T - len(row))
    return {"input_ids": torch.tensor([pad(r, pad_id) for r in rows], dtype=torch.long),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows], dtype=torch.long),
            "embed_mask": torch.tensor([pad(m, 0) for m in embed], dtype=torch.long)}


def _seed_of(*parts) -> int:
    """A 63-bit seed from any parts (seed, epoch, batch content): the same in every DataLoader worker."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------
# 3. MNTP batches
# ---------------------------------------------------------------------------------------------

class MNTPCollator:
    """collate_fn for masked next-token prediction (LLM2Vec, arXiv 2404.05961, sec. 2.1): tokenises reports (str or
    Report) with encode_batch and masks `mask_prob` of the tokens that are neither special nor padding:
    80 % become mask_id, 10 % a random token, 10 % stay (BERT's recipe). labels: the original id where
    masked, -100 elsewhere. Position i is predicted from the output at i-1, so the first token is never
    masked (its label would fall off the shift). Masks come from a generator seeded by (seed, epoch,
    batch content), or (seed, the call's `seed`): the same with any number of DataLoader workers."""

    def __init__(self, tokenizer, max_len: int, pad_id: int, mask_id: int, mask_prob: float = 0.2, seed: int = 0):
        self.tokenizer, self.max_len, self.pad_id, self.mask_id = tokenizer, max_len, pad_id, mask_id
        self.mask_prob, self.seed, self.epoch = mask_prob, seed, 0
        self.vocab_size = tokenizer.get_vocab_size()
        specials = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_ids = torch.tensor(sorted(specials.union(*_special_wrap(tokenizer))), dtype=torch.long)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __call__(self, batch, seed: int | None = None) -> dict[str, torch.Tensor]:
        texts = [t.text() if isinstance(t, Report) else t for t in batch]
        enc = encode_batch(self.tokenizer, texts, self.max_len, self.pad_id)
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        maskable[:, 0] = False
        g = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch, *texts) if seed is None else
                                          _seed_of(self.seed, "call", seed))
        masked = (torch.rand(input_ids.shape, generator=g) < self.mask_prob) & maskable  # (B, T)
        labels = torch.where(masked, input_ids, -100)
        action = torch.rand(input_ids.shape, generator=g)  # < 0.8: mask token, < 0.9: random token, else kept
        random_ids = torch.randint(self.vocab_size, input_ids.shape, generator=g)
        input_ids = torch.where(masked & (action < 0.8), self.mask_id, input_ids)
        input_ids = torch.where(masked & (action >= 0.8) & (action < 0.9), random_ids, input_ids)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class MNTPBatches(torch.utils.data.Dataset):
    """Batch i of an epoch: `batch_size` reports in a seeded shuffled order, tokenised and masked."""

    def __init__(self, reports, collator, batch_size, seed):
        self.texts, self.collator, self.batch_size, self.seed = [r.text() for r in reports], collator, batch_size, seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch, self.order = epoch, list(range(len(self.texts)))
        random.Random(f"{self.seed}/{epoch}").shuffle(self.order)

    def __len__(self):
        return len(self.texts) // self.batch_size

    def __getitem__(self, i):
        texts = [self.texts[j] for j in self.order[i * self.batch_size:(i + 1) * self.batch_size]]
        return self.collator(texts, seed=self.epoch * len(self) + i)


# ---------------------------------------------------------------------------------------------
# 4. Contrastive batches
# ---------------------------------------------------------------------------------------------

def group_keys(texts: list[str], groups=None) -> torch.Tensor:
    """(N, 1) or, with `groups`, (N, 2) int64 keys that put each text into a group: a 63-bit hash of its
    normalize_for_match key and of its entry in `groups` (e.g. the report a variant came from). A hash,
    not a count, so the same text or source gets the same key in every process and every batch: keys
    gathered from all processes can be merged into one grouping of the global batch (groups_from_keys)."""
    columns = [[_seed_of("text", normalize_for_match(t)) for t in texts]]
    if groups is not None:
        columns.append([_seed_of("group", g) for g in groups])
    return torch.tensor(columns, dtype=torch.long).T.reshape(len(texts), len(columns))


def groups_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """(N,) group ids from (N, C) keys: rows equal in any column share an id, transitively (union-find).
    Ids count from 0 in order of first appearance."""
    rows = keys.tolist()
    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i
    first = {}
    for i, row in enumerate(rows):
        for column, key in enumerate(row):
            parent[find(i)] = find(first.setdefault((column, key), i))
    ids = {}
    return torch.tensor([ids.setdefault(find(i), len(ids)) for i in range(len(rows))], dtype=torch.long)


def group_ids_for(texts: list[str], groups=None) -> torch.Tensor:
    """(N,) group ids: texts whose normalize_for_match keys are equal share an id, and so do texts with the
    same entry in `groups` (e.g. the report each variant came from); merging is transitive. Ids count
    from 0 in order of first appearance, so they mean something only within these texts: across
    processes, gather group_keys and merge them (train_text.contrastive_loss). Used for multi-positive
    contrastive loss and for retrieval, where identical reports must not count as negatives of each other."""
    return groups_from_keys(group_keys(texts, groups))


class ContrastiveBatches(torch.utils.data.Dataset):
    """The contrastive stage's batches (arXiv 2509.15234, sec. 2). Item i is the whole batch i of the epoch: use
    DataLoader(batches, batch_size=None). A batch holds k variants (the report itself among them) of each
    of batch_size // k reports, one group id per report; with probability hard_negative_share a report
    adds an error-injected copy (is_hard_negative, a group of its own), with summarize_share its findings
    (behind summarize_instruction) and impression as one more positive pair, which again with
    hard_negative_share brings `impression_negatives` error-injected impressions, each with an error of
    another kind, as hard negatives: the error-discrimination task, findings against the true impression
    and wrong ones (short texts: cheap rows); with sentence_share, one rewritten sentence, the sentence and
    a copy that only the rewritten words tell apart (rewritten_sentence). Identical texts share a group
    across reports. random.Random(seed, epoch, index) draws everything: the same batches with any number
    of workers. Output: input_ids, attention_mask, embed_mask (B, T), group_keys (B, 2) (data.group_keys:
    hashes of the normalised text and of the source report; groups_from_keys turns them into ids, after
    gathering them from every process), is_hard_negative (B,)."""

    def __init__(self, reports: list[Report], tokenizer, pad_id: int, batch_size: int = 48, k: int = 2,
                 max_len: int = 512, instruction: str | None = None, summarize_instruction: str | None = None,
                 hard_negative_share: float = 0.0, summarize_share: float = 0.0, padding_side: str = "left",
                 seed: int = 0, impression_negatives: int = 1, sentence_share: float = 0.0):
        assert batch_size >= k >= 1
        self.reports, self.tokenizer, self.pad_id, self.k, self.max_len = reports, tokenizer, pad_id, k, max_len
        self.per_batch = batch_size // k
        self.instruction, self.summarize_instruction = instruction, summarize_instruction
        self.hard_negative_share, self.summarize_share = hard_negative_share, summarize_share
        self.padding_side, self.seed, self.impression_negatives = padding_side, seed, impression_negatives
        self.sentence_share = sentence_share
        self.set_epoch(0)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        self.order = list(range(len(self.reports)))
        random.Random(f"{self.seed}/{epoch}").shuffle(self.order)

    def __len__(self):
        return len(self.reports) // self.per_batch

    def rows(self, index: int) -> list[tuple[str, str | None, int, bool]]:
        """The batch as (text, instruction, report index, is hard negative): what __getitem__ tokenises."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        rows = []
        for j in self.order[index * self.per_batch:(index + 1) * self.per_batch]:
            report = self.reports[j]
            pool = [normalize_report(report.text())] + list(make_variants(report, rng).values())
            chosen = rng.sample(pool, min(self.k, len(pool)))
            rows += [(t, self.instruction, j, False) for t in chosen]
            rows += self.hard_negative(pool[0], -1 - j, rng, chosen)
            if report.findings and report.impression and rng.random() < self.summarize_share:
                impression, pair = normalize_report(report.impression), len(self.reports) + j
                rows += [(normalize_report(report.findings), self.summarize_instruction, pair, False),
                         (impression, self.instruction, pair, False)]
                # the impression with one error: its findings must tell it from the true one
                rows += self.hard_negative(impression, -1 - pair, rng, n=self.impression_negatives)
            if self.sentence_share and rng.random() < self.sentence_share:  # at 0, the draws of before
                rows += self.rewritten_sentence(pool[0], 2 * len(self.reports) + j, rng)
        return rows

    def rewritten_sentence(self, text, source, rng):
        """Three short rows: one sentence of the (normalised) report text abbreviated or reworded (training family) and the
        sentence itself as positives, and the sentence with a term swapped exactly where the rewrite changed
        it as their hard negative (variants.unseen_edits). Between whole reports the unchanged rest of the
        text makes the match; in one sentence only what the rewritten words mean does. [] if no sentence
        allows it."""
        sents = sentences(text)
        for sentence in rng.sample(sents, len(sents)):
            rewrite = abbreviate(sentence, "train") if rng.random() < 0.5 else reword(sentence, rng, "train", 1.0)[0]
            copies = unseen_edits(sentence, rewrite, rng) if rewrite != sentence else []
            if copies:
                return [(rewrite, self.instruction, source, False), (sentence, self.instruction, source, False),
                        (rng.choice(copies)[0], self.instruction, -1 - source, True)]
        return []

    def hard_negative(self, text, source, rng, chosen=(), n=1):
        """With probability hard_negative_share, one row: where two chosen variants differ in words (abbreviated
        and expanded, reworded), the second changed only where the first rewrote it (variants.unseen_edits:
        only reading the rewritten words tells them apart); else up to n rows: text with an error of a
        random kind, each of another kind."""
        if rng.random() >= self.hard_negative_share:
            return []
        edits = unseen_edits(chosen[1], chosen[0], rng) if len(chosen) > 1 else []
        if edits:
            return [(rng.choice(edits)[0], self.instruction, source, True)]
        wrongs = []
        for kind in rng.sample(ERROR_KINDS, len(ERROR_KINDS)):
            wrong = inject_error(text, kind, rng)
            if wrong and wrong not in wrongs:
                wrongs.append(wrong)
                if len(wrongs) == n:
                    break
        return [(wrong, self.instruction, source, True) for wrong in wrongs]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.rows(index)
        texts = [r[0] for r in rows]
        batch = encode_batch(self.tokenizer, texts, self.max_len, self.pad_id, [r[1] for r in rows],
                             self.padding_side)
        batch["group_keys"] = group_keys(texts, [r[2] for r in rows])  # ids only once all processes' rows are in
        batch["is_hard_negative"] = torch.tensor([r[3] for r in rows], dtype=torch.bool)
        return batch


# ---------------------------------------------------------------------------------------------
# 5. Images and CLIP pairs
# ---------------------------------------------------------------------------------------------
# Real images (MIMIC-CXR-JPG, Open-I PNG) and the CLIP pairs. Resizing uses torch's antialiased
# interpolation: torchvision does not import beside current torch builds on every platform.

def load_image(path) -> np.ndarray:
    """A PNG/JPG as float32 (H, W) in [0, 1]: 8- or 16-bit, grayscale or colour (converted to gray)."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here rather than later
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (older Pillow: "I")
                return np.asarray(im, dtype=np.float32) / 65535
            return np.asarray(im.convert("L"), dtype=np.float32) / 255
    except Exception as e:  # Pillow raises several types; callers need one
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


class ImageTransform:
    """(H, W) float image -> normalised FloatTensor (channels, size, size). train: random-resized crop
    of 90-100 % of the area (paper: scale 0.9-1.0), aspect 3/4-4/3; eval: shorter side to `size`, centre
    crop. The randomness comes from (seed, key, epoch), never global state, so DataLoader workers and a
    single process produce the same crops."""

    def __init__(self, size: int = 256, train: bool = False, channels: int = 1, mean=0.5, std=0.5, seed: int = 0):
        self.size, self.train, self.channels, self.seed = size, train, channels, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)  # a float or one per channel
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, img: np.ndarray, key: int = 0, epoch: int = 0) -> torch.Tensor:
        (H, W), s = img.shape, self.size
        x = torch.from_numpy(np.asarray(img, dtype=np.float32))[None, None]  # (1, 1, H, W)
        if self.train:  # a random crop, resized to (s, s)
            rng = np.random.default_rng([self.seed, key, epoch])
            area, ratio = H * W * rng.uniform(0.9, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            h, w = min(H, round(math.sqrt(area / ratio))), min(W, round(math.sqrt(area * ratio)))
            top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
            x, h, w = x[..., top:top + h, left:left + w], s, s
        else:  # the shorter side to s, then the centre crop
            h, w = max(s, round(H * s / min(H, W))), max(s, round(W * s / min(H, W)))
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]  # (1, 1, s, s)
        return (x[0].expand(self.channels, s, s) - self.mean) / self.std  # (C, s, s)


class ImageReportDataset(torch.utils.data.Dataset):
    """(image, report text, index) over real reports with images, the first listed image of each
    (the readers list the frontal view first). An unreadable image yields None, which
    `collate_pairs` drops and counts: one corrupt file among 300k never stops an epoch. Set `.epoch`
    before each epoch for fresh crops (read by workers unless they are persistent)."""

    def __init__(self, reports: list, transform: ImageTransform):
        self.reports, self.transform, self.epoch = [r for r in reports if r.images], transform, 0

    def __len__(self):
        return len(self.reports)

    def __getitem__(self, i):
        try:
            img = load_image(self.reports[i].images[0])
        except OSError as e:
            self.last_error = str(e)  # names the file; read in this process if every image fails
            return None
        return self.transform(img, key=i, epoch=self.epoch), self.reports[i].text(), i


def collate_pairs(batch):
    """-> images (B, C, H, W), texts, indices (B,), n_skipped. The skip count travels with the batch,
    so it survives worker processes; the training loop sums it and reports it at the epoch's end."""
    kept = [b for b in batch if b is not None]
    images = torch.stack([b[0] for b in kept]) if kept else torch.empty(0)
    return images, [b[1] for b in kept], torch.tensor([b[2] for b in kept], dtype=torch.long), len(batch) - len(kept)


class PairBatches(torch.utils.data.Dataset):
    """Batch i of an epoch: the studies order[i·B:(i+1)·B] of a permutation seeded by (seed, epoch)
    alone; crops seeded by (study, epoch). Since the order does not depend on B, under torchrun rank r's
    batch i (our batch N·i + r, see runtime.EndlessBatches) is the r-th part of a single process's batch i
    at batch size N·B: the same global batch, gathered in the same order.

    `text_side(indices, texts) -> dict` adds the text side (cached embeddings or tokens). An unreadable
    image is replaced by the next study of the epoch's order after this batch, and counted."""

    def __init__(self, studies, text_side, batch_size, seed):
        self.studies, self.text_side, self.batch_size, self.seed = studies, text_side, batch_size, seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch = self.studies.epoch = epoch  # the studies' transform reads the epoch: fresh crops
        self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.studies)).tolist()

    def __len__(self):
        return len(self.studies) // self.batch_size

    def __getitem__(self, i):
        B, n = self.batch_size, len(self.order)
        items, spare = [], (i + 1) * B
        for j in self.order[i * B:(i + 1) * B]:
            item = self.studies[j]
            while item is None and spare < (i + 1) * B + n:
                item, spare = self.studies[self.order[spare % n]], spare + 1
            if item is None:
                raise OSError(f"none of the {n} training images can be read, e.g. "
                              f"{getattr(self.studies, 'last_error', '?')}: check data.image_root and the image "
                              "paths in data.path")
            items.append(item)
        images, texts, indices, _ = collate_pairs(items)
        return {"images": images, **self.text_side(indices, texts), "n_skipped": spare - (i + 1) * B}
