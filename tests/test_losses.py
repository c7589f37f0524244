"""Tests for losses.py: each loss against a naive loop reference, gradcheck, fp32 under autocast,
extreme temperatures, and 2 gloo processes against one process holding the whole batch."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import gloo
from losses import clip_loss, mntp_loss, supcon_loss


# ---- naive references: explicit loops over Python floats, straight from the papers' formulas ----

def cos(u, v):
    return float(u.double() @ v.double() / (u.double().norm() * v.double().norm()))


def supcon_reference(emb, groups, tau, hard=None, anchors=None, candidates=None):
    """Khosla et al. 2020, eq. 2, one anchor at a time."""
    n = len(emb)
    hard = hard if hard is not None else [False] * n
    anchors = anchors if anchors is not None else [True] * n
    candidates = candidates if candidates is not None else [True] * n
    total, count = 0.0, 0
    for i in range(n):
        if hard[i] or not anchors[i]:
            continue
        others = [a for a in range(n) if a != i and candidates[a]]
        positives = [p for p in others if int(groups[p]) == int(groups[i]) and not hard[p]]
        if not positives:
            continue
        denominator = sum(math.exp(cos(emb[i], emb[a]) / tau) for a in others)
        terms = [math.log(math.exp(cos(emb[i], emb[p]) / tau) / denominator) for p in positives]
        total += -sum(terms) / len(positives)
        count += 1
    return total / count if count else 0.0


def clip_reference(img, txt, scale):
    """CLIP's symmetric cross-entropy, one row at a time."""
    b = len(img)
    loss_i2t = loss_t2i = 0.0
    for i in range(b):
        loss_i2t -= math.log(math.exp(scale * cos(img[i], txt[i])) /
                             sum(math.exp(scale * cos(img[i], txt[j])) for j in range(b)))
        loss_t2i -= math.log(math.exp(scale * cos(txt[i], img[i])) /
                             sum(math.exp(scale * cos(txt[i], img[j])) for j in range(b)))
    return (loss_i2t / b + loss_t2i / b) / 2


def mntp_reference(hidden, labels, lm_head):
    """The slow way: full (B, T, vocab) logits, shifted, cross-entropy at the masked positions."""
    logits = lm_head(hidden)  # (B, T, V)
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100)


# ---- supcon ----

GROUPS = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0, 4, 2])  # repeats, singletons (3, 4)
HARD = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 0, 1]).bool()  # 7 shares group 0, 9 shares group 2


@pytest.mark.parametrize("tau", [0.02, 0.1, 1.0])
def test_supcon_matches_reference(tau):
    torch.manual_seed(0)
    emb = torch.randn(10, 8)
    for hard in (None, HARD):
        expected = supcon_reference(emb, GROUPS, tau, hard)
        assert supcon_loss(emb, GROUPS, tau, hard).item() == pytest.approx(expected, rel=1e-5)


def test_supcon_anchor_and_candidate_masks_match_reference():
    torch.manual_seed(1)
    emb = torch.randn(10, 8)
    anchors = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1, 1]).bool()
    candidates = torch.tensor([0, 1, 1, 1, 1, 0, 1, 1, 1, 1]).bool()
    expected = supcon_reference(emb, GROUPS, 0.05, HARD, anchors, candidates)
    got = supcon_loss(emb, GROUPS, 0.05, HARD, anchors, candidates)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("with_hard_negatives", [False, True])
def test_supcon_one_positive_equals_llm2vec_infonce(with_hard_negatives):
    """LLM2Vec: cross_entropy(cos(q, [d+; d-]) * 50, arange(B)); no query in the denominator."""
    torch.manual_seed(2)
    B, d = 6, 16
    q, pos, neg = torch.randn(B, d), torch.randn(B, d), torch.randn(B, d)
    docs = torch.cat([pos, neg]) if with_hard_negatives else pos
    scores = F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T * 50  # (B, B or 2B)
    expected = F.cross_entropy(scores, torch.arange(B))

    k = 3 if with_hard_negatives else 2  # rows: q, d+ (, d-)
    emb = torch.cat([q, pos, neg][:k])
    ids = torch.arange(B).repeat(k)
    role = torch.arange(k).repeat_interleave(B)  # 0: query, 1: positive, 2: hard negative
    got = supcon_loss(emb, ids, temperature=0.02, hard_negative=role == 2,
                      anchors=role == 0, candidates=role != 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_supcon_defaults_with_one_positive_are_nt_xent():
    """The default (all rows anchors and candidates) is the symmetric SimCLR form, not LLM2Vec's."""
    torch.manual_seed(3)
    B = 4
    emb = torch.randn(2 * B, 8)
    z = F.normalize(emb, dim=-1)
    logits = (z @ z.T / 0.02).fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    expected = F.cross_entropy(logits, partner)
    got = supcon_loss(emb, torch.arange(B).repeat(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---- clip ----

def test_clip_matches_reference():
    torch.manual_seed(4)
    img, txt = torch.randn(7, 8), torch.randn(7, 8)
    for scale in (1 / 0.07, 100.0):
        got = clip_loss(img, txt, torch.tensor(scale))
        assert got.item() == pytest.approx(clip_reference(img, txt, scale), rel=1e-5)


def test_clip_normalising_twice_changes_nothing():
    torch.manual_seed(5)
    x = torch.randn(6, 8, requires_grad=True)
    txt = torch.randn(6, 8)
    grads = []
    for features in (lambda x: x, lambda x: F.normalize(x, dim=-1)):
        x.grad = None
        clip_loss(features(x) * 3, txt, torch.tensor(20.0)).backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ---- mntp ----

def mntp_batch(seed, B=3, T=12, d=16, V=50, mask_p=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    masked = torch.rand(B, T, generator=g) < mask_p
    masked[:, 0] = False  # the first token has no previous state to predict it from
    masked[0, 1] = True
    labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
    return hidden, labels, nn.Linear(d, V, bias=False)


def test_mntp_matches_full_logits():
    hidden, labels, head = mntp_batch(0)
    expected = mntp_reference(hidden, labels, head)
    torch.testing.assert_close(mntp_loss(hidden, labels, head), expected)


def test_mntp_shift_and_only_masked_rows_reach_the_head():
    hidden, labels, head = mntp_batch(1)
    seen = []
    mntp_loss(hidden, labels, lambda h: seen.append(h) or head(h))
    (rows,) = seen
    assert rows.shape == (int((labels != -100).sum()), hidden.shape[-1])  # never (B, T, vocab)
    b, t = (labels != -100).nonzero()[0]
    torch.testing.assert_close(rows[0], hidden[b, t - 1])  # token at t from the state at t - 1


def test_mntp_no_masked_token_is_zero_with_grad():
    hidden, labels, head = mntp_batch(2)
    hidden.requires_grad_(True)
    loss = mntp_loss(hidden, torch.full_like(labels, -100), head)
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert hidden.grad.abs().sum() == 0


def test_mntp_bf16_autocast_close_to_fp32():
    hidden, labels, head = mntp_batch(3, V=500)
    expected = mntp_loss(hidden, labels, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mntp_loss(hidden, labels, head)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


# ---- gradcheck (float64) ----

def test_gradcheck():
    torch.manual_seed(6)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    groups, hard = torch.tensor([0, 0, 1, 1, 1, 2, 3, 0]), torch.tensor([0] * 7 + [1]).bool()
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, groups, 0.5, hard), (x,))

    img = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(clip_loss, (img, txt, scale))

    hidden, labels, head = mntp_batch(7, B=2, T=6, d=4, V=7, mask_p=0.5)
    hidden = hidden.double().requires_grad_(True)
    weight = head.weight.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, w: mntp_loss(h, labels, lambda x: x @ w.T),
                                    (hidden, weight))


# ---- precision and extremes ----

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contrastive_losses_fp32_under_autocast(dtype):
    torch.manual_seed(8)
    emb, txt = torch.randn(10, 8), torch.randn(10, 8)
    layer = nn.Linear(8, 8)
    expected = supcon_loss(layer(emb), GROUPS, 0.01, HARD), clip_loss(layer(emb), txt, 100.0)
    with torch.autocast("cpu", dtype=dtype):
        features = layer(emb)  # low precision, as the model would hand them over
        assert features.dtype == dtype
        got = supcon_loss(features, GROUPS, 0.01, HARD), clip_loss(features, txt, 100.0)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.05)  # only the features were rounded


def test_finite_at_temperature_001_with_large_norms():
    torch.manual_seed(9)
    emb = (torch.randn(10, 8) * 1e4).requires_grad_(True)
    for loss in (supcon_loss(emb, GROUPS, 0.01, HARD), clip_loss(emb, emb.flip(0), 100.0),
                 supcon_loss(emb, torch.zeros(10, dtype=torch.long), 0.01)):  # a single group
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
        emb.grad = None


def test_supcon_single_group_and_no_anchor():
    """One group, no negatives: finite, >= 0. No item with a positive: zero, still in the graph."""
    torch.manual_seed(10)
    emb = torch.randn(6, 8, requires_grad=True)
    one_group = supcon_loss(emb, torch.zeros(6, dtype=torch.long))
    assert torch.isfinite(one_group) and one_group.item() >= 0
    none = supcon_loss(emb, torch.arange(6))
    assert none.item() == 0 and none.grad_fn is not None
    none.backward()
    assert torch.isfinite(emb.grad).all()


# ---- two processes (gloo) vs one process holding the whole batch ----

class Towers(nn.Module):
    def __init__(self, d_in=5, d=4):
        super().__init__()
        self.image, self.text = nn.Linear(d_in, d), nn.Linear(d_in, d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_image, x_text):
        return self.image(x_image), self.text(x_text), self.logit_scale.exp()


def losses_and_grads(rank, world):
    """Each case's loss (averaged over ranks) and gradients, this rank holding its share."""
    g = torch.Generator().manual_seed(0)
    M, B, d_in = 8, 6, 5  # 8 rows (clip, supcon), 6 (query, positive, hard negative) triples
    x_image, x_text = torch.randn(M, d_in, generator=g), torch.randn(M, d_in, generator=g)
    x_q, x_pos, x_neg = (torch.randn(B, d_in, generator=g) for _ in range(3))
    groups = torch.tensor([0, 1, 0, 1, 3, 1, 5, 0])  # positives within and across ranks (1, 5)
    hard = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1]).bool()  # so anchors: 3 on rank 0, 1 on rank 1
    mine, mine_triples = (slice(rank * n // world, (rank + 1) * n // world) for n in (M, B))
    wrap = DistributedDataParallel if world > 1 else (lambda m: m)

    def clip_case(model):
        return clip_loss(*model(x_image[mine], x_text[mine]))

    def supcon_case(model):
        return supcon_loss(model(x_image[mine]), groups[mine], 0.05, hard[mine])

    def supcon_uneven_case(model):  # rank 0 holds 3 rows, rank 1 holds 5 (random hard negatives do this)
        rows = slice(0, 8) if world == 1 else (slice(0, 3) if rank == 0 else slice(3, 8))
        return supcon_loss(model(x_image[rows]), groups[rows], 0.05, hard[rows])

    def llm2vec_case(model):  # each rank: [q; d+; d-] of its own triples; candidates from all ranks
        emb = model(torch.cat([x_q[mine_triples], x_pos[mine_triples], x_neg[mine_triples]]))
        ids = torch.arange(B)[mine_triples].repeat(3)
        role = torch.arange(3).repeat_interleave(B // world)  # 0: query, 1: d+, 2: d-
        return supcon_loss(emb, ids, 0.05, role == 2, anchors=role == 0, candidates=role != 0)

    results = {}
    for name, case, make in (("clip", clip_case, Towers), ("supcon", supcon_case, nn.Linear),
                             ("supcon_uneven", supcon_uneven_case, nn.Linear), ("llm2vec", llm2vec_case, nn.Linear)):
        torch.manual_seed(1)  # the same initial weights in every process
        module = make(d_in, 4)
        model = wrap(module)  # kept alive until backward is done: DDP's hooks die with it
        loss = case(model)
        loss.backward()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        results[name] = [loss] + [p.grad.clone() for p in module.parameters()]
    return results


def _worker(rank, world, out):
    results = losses_and_grads(rank, world)
    if rank == 0:
        torch.save(results, out)


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    gloo.spawn(_worker, 2, str(out))
    two, one = torch.load(out), losses_and_grads(0, 1)
    for name in one:
        for got, expected in zip(two[name], one[name]):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


# ---- stage 1's contrastive loss over processes: group ids from the texts, merged over all ranks ----

# (text, source report, is hard negative) per row, the global batch in rank-major order; each case
# splits it after SPLIT[case] rows (rank 0 first). Sources as data.ContrastiveBatches numbers them.
CONTRASTIVE_CASES = {
    # "no acute cardiopulmonary disease" on both ranks, from two reports: one group over both ranks
    # (and by transitivity their other variants), never each other's negatives
    "same_text_on_two_ranks": ([("No acute cardiopulmonary disease.", 1, False),
                                ("Heart size normal. No acute cardiopulmonary disease.", 1, False),
                                ("Small left pleural effusion.", 2, False), ("Left effusion, small.", 2, False),
                                ("no acute cardiopulmonary disease", 3, False), ("Lungs are clear.", 3, False),
                                ("Right pneumothorax.", 4, False), ("Pneumothorax on the right.", 4, False)], 4),
    # uneven ranks (random hard negatives): rank 0 has 4 groups in 6 rows, rank 1 2 rows, so the old
    # ids (0..3 on rank 0, 0 + 1·2 = 2 on rank 1) merged rank 1's report with rank 0's second one
    "offset_collision": ([("Cardiomegaly.", 1, False), ("The heart is enlarged.", 1, False),
                          ("No cardiomegaly.", -2, True), ("Small right effusion.", 2, False),
                          ("Right effusion, small.", 2, False), ("Large right effusion.", -3, True),
                          ("Left upper lobe nodule.", 3, False), ("Nodule in the left upper lobe.", 3, False)], 6),
}


def contrastive_losses_and_grads(rank, world):
    """train_text.contrastive_loss on each case, this rank holding its share of the rows; the loss
    averaged over ranks and the (DDP-averaged) gradients."""
    import data
    import train_text
    results = {}
    for name, (rows, split) in CONTRASTIVE_CASES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(len(rows), 5, generator=g)
        mine = slice(0, len(rows)) if world == 1 else (slice(0, split) if rank == 0 else slice(split, len(rows)))
        batch = {"group_keys": data.group_keys([r[0] for r in rows[mine]], [r[1] for r in rows[mine]]),
                 "is_hard_negative": torch.tensor([r[2] for r in rows[mine]])}
        torch.manual_seed(1)
        module = nn.Linear(5, 4)
        model = DistributedDataParallel(module) if world > 1 else module
        loss = train_text.contrastive_loss(model(x[mine]), batch, 0.05)
        loss.backward()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        results[name] = [loss] + [p.grad.clone() for p in module.parameters()]
    return results


def _contrastive_worker(rank, world, out):
    results = contrastive_losses_and_grads(rank, world)
    if rank == 0:
        torch.save(results, out)


def old_offset_loss(rows, split):
    """What the per-rank ids offset by rank · rows gave (gathering is exact, so one process with those ids)."""
    import data
    parts = [rows[:split], rows[split:]]
    ids = torch.cat([data.group_ids_for([r[0] for r in p], [r[1] for r in p]) + rank * len(p)
                     for rank, p in enumerate(parts)])
    x = torch.randn(len(rows), 5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    return supcon_loss(nn.Linear(5, 4)(x), ids, 0.05, torch.tensor([r[2] for r in rows]))


def test_contrastive_groups_two_processes_equal_one_process(tmp_path):
    """Stage 1's loss (train_text.contrastive_loss) with 2 gloo processes equals 1 process holding the
    whole batch, loss and gradients, when the same normalised text sits on both ranks and when the
    ranks hold different numbers of rows. The reference groups are checked by hand too."""
    import data
    for name, (rows, _) in CONTRASTIVE_CASES.items():  # the single-process grouping is the intended one
        ids = data.group_ids_for([r[0] for r in rows], [r[1] for r in rows]).tolist()
        expected = {"same_text_on_two_ranks": [0, 0, 1, 1, 0, 0, 2, 2],
                    "offset_collision": [0, 0, 1, 2, 2, 3, 4, 4]}[name]
        assert ids == expected, name
    out = tmp_path / "rank0.pt"
    gloo.spawn(_contrastive_worker, 2, str(out))
    two, one = torch.load(out), contrastive_losses_and_grads(0, 1)
    for name in one:
        old = old_offset_loss(*CONTRASTIVE_CASES[name]).item()
        print(f"{name}: 1 process {one[name][0].item():.6f}, 2 processes {two[name][0].item():.6f}, "
              f"old per-rank offsets {old:.6f} (difference {old - one[name][0].item():+.4f})")
        assert abs(old - one[name][0].item()) > 1e-3, name  # the case tells the schemes apart
        for got, expected in zip(two[name], one[name]):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
