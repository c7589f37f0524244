"""The three training losses, and the feature gather that makes them exact across processes.

- mntp_loss:   masked next-token prediction, stage 1 (LLM2Vec, BehnamGhader et al. 2024, sec. 2).
- supcon_loss: supervised contrastive loss on report variants, stage 1 (Khosla et al. 2020, the
               L_out form, eq. 2); with one positive per anchor it is LLM2Vec's InfoNCE.
- clip_loss:   symmetric image-report InfoNCE, stage 2 (CLIP, Radford et al. 2021), as open_clip.

The softmaxes run in (at least) fp32, also under bf16/fp16 autocast: at temperature 0.01 the logits
reach +-100, where bf16 rounds to steps of 0.5.

Multi-process, "gather with grad, local loss" (open_clip): each rank gathers the features of all N
ranks (gather_features) and computes the loss for its own b rows only, against all N·b rows. The
gather's backward sums over ranks the gradient that each rank's loss sends to every row, and hands
each rank the slice of its own rows; DDP then averages parameter gradients over ranks. So
    grad = 1/N Σ_r ∂loss_r/∂θ = ∂/∂θ (1/N Σ_r loss_r),
and 1/N Σ_r loss_r, each loss_r a mean over its rank's rows, is the mean over all N·b rows: the
loss, and gradient, of one process holding the whole batch. Ranks may hold different numbers of
rows (a contrastive batch with a random number of hard negatives): the gather pads and strips.

Tests: python -m pytest tests/test_losses.py -q
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGather(torch.autograd.Function):
    """all_gather whose backward gives each rank the sum over ranks of the gradient of its rows."""

    @staticmethod
    def forward(ctx, x, sizes):  # x: (b_r, ...) -> (Σ b_r, ...), rank-major; sizes: every b_r
        padded = x.new_zeros(max(sizes), *x.shape[1:])  # all_gather needs equal shapes
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.start, ctx.size = sum(sizes[:dist.get_rank()]), x.shape[0]
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):  # grad: (Σ b_r, ...), d loss_r / d (all rows) on rank r
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # Σ_r: our rows are also negatives in every other rank's loss
        return grad[ctx.start:ctx.start + ctx.size], None


def gather_features(x):
    """Concatenate x (b_r, ...) over all ranks -> (Σ b_r, ...), and the offset of this rank's rows.

    Gradients reach this rank's rows from the losses of all ranks. Gathering without grad and
    putting the local tensor back in its slot (open_clip's default) is not enough with a local
    loss: it drops the gradient that other ranks' losses send to our rows as their negatives.
    Without torch.distributed initialised it returns (x, 0).
    """
    if world_size() == 1:
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    return _AllGather.apply(x, sizes), sum(sizes[:dist.get_rank()])


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _fp32(x):
    """At least fp32: bf16/fp16 go up, fp64 stays (gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mntp_loss(hidden, labels, lm_head):
    """Masked next-token prediction (LLM2Vec, BehnamGhader et al. 2024).

    hidden (B, T, d): last hidden states of the bidirectional model. labels (B, T): the original
    token id where the input was masked, -100 elsewhere. lm_head: the model's causal LM head,
    (N, d) -> (N, vocab). The token masked at position i is predicted from the state at i - 1, so
    the pretrained head keeps its job of predicting the next token. Returns the mean cross-entropy
    over masked tokens, or a zero still in the graph (backward works) when nothing is masked.
    Under DDP each rank averages over its own masked tokens, not the global token mean; with 20 %
    of 512 tokens masked the counts differ little.
    """
    hidden, labels = hidden[:, :-1], labels[:, 1:]  # state at i - 1 predicts the token at i
    masked = labels != -100  # (B, T-1)
    # the head only on masked rows: (N, vocab), never (B, T, vocab), most of MNTP's cost and memory
    logits = _fp32(lm_head(hidden[masked]))  # (N, vocab)
    if logits.shape[0] == 0:
        return logits.sum()
    return F.cross_entropy(logits, labels[masked])


def supcon_loss(embeddings, group_ids, temperature=0.02, hard_negative=None, anchors=None,
                candidates=None, gather=True):
    """Supervised contrastive loss, L_out form (Khosla et al. 2020, eq. 2), on cosine similarity.

    embeddings (n, d). group_ids (n,) int: items with the same id are positives of each other.
    Identical texts must share an id (data.group_ids_for), so two "no acute disease" reports in
    one batch are never pushed apart; with gather=True an id must mean the same on every rank
    (stage 1 builds them from the gathered rows of all ranks: train_text.contrastive_loss).
    hard_negative (n,) bool: error-injected reports, only ever negatives: never anchors and never
    positives, even when their group id matches. anchors, candidates (n,) bool, default all:
    which rows are anchors, and which may enter the denominator (as positive or negative).

    For an anchor i, with A(i) the candidates other than i and P(i) the positives in A(i):
        l_i = -1/|P(i)| Σ_{p in P(i)} log( exp(s_ip / τ) / Σ_{a in A(i)} exp(s_ia / τ) )
    averaged over anchors with at least one positive; others are skipped (0 if none is left).
    Its minimum is log|P(i)|, not 0 (all positives equally close). A single-group batch has no
    negatives and stays finite: it only pulls the group together.

    LLM2Vec's InfoNCE is cross_entropy(cos(q, [d+; d-]) / τ, arange(B)): queries against
    positives and hard negatives only. Rows [q; d+; d-], ids [k; k; k] (k = 0..B-1, distinct),
    anchors = the q rows, candidates = the d+ and d- rows, hard_negative = the d- rows, give
    exactly that. With the defaults (every row an anchor and a candidate) one positive per anchor
    gives instead SimCLR's NT-Xent over all 2B rows: d+ rows anchor too, other q rows are negatives.

    gather=True: anchors are this rank's rows, candidates the rows of all ranks. The sum over
    local anchors is divided by (global anchor count / N), so the mean over ranks (and DDP's
    averaged gradient) is the single-process loss of the whole batch, however anchors fall.
    """
    every = torch.ones_like(group_ids, dtype=torch.bool)
    hard = torch.zeros_like(every) if hard_negative is None else hard_negative.bool()
    anchors = (every if anchors is None else anchors.bool()) & ~hard
    candidates = every if candidates is None else candidates.bool()
    _gather = gather_features if gather else (lambda x: (x, 0))
    z, offset = _gather(embeddings)  # (M, d), M = N·n
    all_groups, all_hard, all_candidates = (_gather(x)[0] for x in (group_ids, hard, candidates))

    n, M = embeddings.shape[0], z.shape[0]
    rows = torch.arange(n, device=z.device)
    is_self = torch.zeros(n, M, dtype=torch.bool, device=z.device)
    is_self[rows, offset + rows] = True
    in_denominator = all_candidates[None, :] & ~is_self  # A(i), (n, M)
    positive = in_denominator & ~all_hard[None, :] & (group_ids[:, None] == all_groups[None, :])
    anchors = anchors & positive.any(1)  # (n,)

    with torch.autocast(z.device.type, enabled=False):  # keep matmul and softmax in fp32
        z = F.normalize(_fp32(z), dim=-1)
        logits = z[offset:offset + n][anchors] @ z.T / temperature  # (A, M)
        logits = logits.masked_fill(~in_denominator[anchors], float("-inf"))
        log_prob = logits.log_softmax(dim=-1)  # s_ij/τ - log Σ_{a in A(i)} exp(s_ia/τ)
        pos = positive[anchors]  # (A, M)
        loss_per_anchor = -log_prob.masked_fill(~pos, 0).sum(-1) / pos.sum(-1)  # SupCon, eq. 2
    n_anchors = _gather(anchors.sum().view(1))[0].sum()  # over all N ranks
    # / (n_anchors / N): the mean over ranks, DDP's average, is the mean over all anchors
    return loss_per_anchor.sum() / n_anchors.clamp(min=1) * (world_size() if gather else 1)


def clip_loss(image_features, text_features, logit_scale, gather=True):
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, fig. 3), as open_clip's ClipLoss.

    image_features, text_features (b, d): row i of each is one (image, report) pair. They are
    L2-normalised here; the model usually has done it already, and normalising twice changes
    neither the value nor the gradient reaching the model. logit_scale: the scale itself (a scalar tensor), not its
    log. As in open_clip, the model holds the learnable log-scale log(1/0.07) (temperature
    0.07), clamps it to [0, log(100)] after each optimizer step, and passes logit_scale.exp().
    gather=True: this rank's rows against all ranks' rows (local loss, see the module docstring).
    """
    b = image_features.shape[0]
    _gather = gather_features if gather else (lambda x: (x, 0))
    all_image, offset = _gather(image_features)  # (M, d)
    all_text, _ = _gather(text_features)  # (M, d)
    labels = offset + torch.arange(b, device=all_image.device)  # row of each pair's partner

    with torch.autocast(all_image.device.type, enabled=False):  # keep matmul and softmax in fp32
        all_image = F.normalize(_fp32(all_image), dim=-1)
        all_text = F.normalize(_fp32(all_text), dim=-1)
        logits_per_image = logit_scale * all_image[offset:offset + b] @ all_text.T  # (b, M)
        logits_per_text = logit_scale * all_text[offset:offset + b] @ all_image.T  # (b, M)
        return (F.cross_entropy(logits_per_image, labels) +
                F.cross_entropy(logits_per_text, labels)) / 2
