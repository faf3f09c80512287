"""The sequence recommender behind the teacher and the SASRec baseline (SASRec family).

A causal transformer over a user's history of items (Kang & McAuley, 2018), trained on every
position of each training sequence with cross entropy over the whole catalogue, or, above
`SeqSpec.sampled_above` items, over a shared sample of the catalogue with the logQ correction
(Jean et al., 2015; Yi et al., 2019). An item is an ID embedding, plus, when the spec has
`text_dim`, an adaptor (a small MLP, or linear) over a whitened frozen encoder embedding of the
item's text (UniSRec's "parametric whitening", Hou et al., 2022). With `use_id=False` the item is
text only.

Histories are left-padded id tensors (0 = padding, 1 = unknown item), oldest item first, as
everywhere in the platform. Positions count back from the most recent item, so a history of any
length puts its last item at the same position embedding.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .spec import spec_from_json

PAD, UNK = 0, 1


@dataclass(frozen=True)
class SeqSpec:
    """The shape of one sequence model; saved with the weights (`teacher.json`)."""

    n_items: int            # vocabulary size, the two reserved ids included
    dim: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.5
    max_history: int = 50
    text_dim: int = 0       # width of the frozen item text embeddings; 0 = ID-only (the SASRec baseline)
    use_id: bool = True     # False: items are their text alone (cold-start catalogues)
    adaptor_hidden: int = 0  # hidden width of the text adaptor's MLP; 0 = a linear adaptor

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, source: str = "sequence spec") -> "SeqSpec":
        return spec_from_json(cls, d, source)


class CausalBlock(nn.Module):
    """Pre-norm self-attention + feed-forward, each residual (the nanoGPT block)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], mask [B, 1, L, L] True = may attend -> [B, L, D]."""
        b, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.ff(self.ln2(x)))


def whitening(emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [H], W [H, H]) so that (emb - mean) @ W has identity covariance over the real items
    (rows 2: of `emb`). Sentence-encoder embeddings are anisotropic (all pairwise cosines high); the
    adaptor learns faster from whitened ones. Small eigenvalues are floored, not inverted."""
    real = emb[2:].double()
    mean = real.mean(0)
    if len(real) < 2:
        return mean.float(), torch.eye(emb.shape[1])
    cov = torch.cov((real - mean).T)
    vals, vecs = torch.linalg.eigh(cov)
    floor = vals.max().clamp(min=1e-12) * 1e-4
    return mean.float(), (vecs / vals.clamp(min=floor).sqrt()).float()


def text_adaptor(text_dim: int, hidden: int, dim: int) -> nn.Sequential:
    """[..., text_dim] whitened text embeddings -> [..., dim]. A linear map can only rotate and scale
    the encoder's space: on Office a text-only model through it reached test NDCG@10 0.049, through
    the MLP (hidden 256) 0.064 (one seed)."""
    if not hidden:
        return nn.Sequential(nn.Dropout(0.1), nn.Linear(text_dim, dim))
    return nn.Sequential(nn.Dropout(0.1), nn.Linear(text_dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, dim))


class SequenceModel(nn.Module):
    def __init__(self, spec: SeqSpec, item_text: torch.Tensor | None = None):
        """`item_text` [n_items, text_dim]: the frozen encoder's embedding of every item's text
        (rows 0 and 1 ignored); needed when spec.text_dim > 0, else a placeholder that
        `load_state_dict` fills."""
        super().__init__()
        if not spec.use_id and not spec.text_dim:
            raise ValueError("a sequence model needs item IDs, item text (text_dim > 0) or both")
        self.spec = spec
        d = spec.dim
        self.item = nn.Embedding(spec.n_items, d, padding_idx=PAD) if spec.use_id else None
        if self.item is not None:
            nn.init.normal_(self.item.weight, std=0.02)
            with torch.no_grad():
                self.item.weight[PAD].zero_()
        if spec.text_dim:
            text = torch.zeros(spec.n_items, spec.text_dim) if item_text is None else item_text.float()
            if text.shape != (spec.n_items, spec.text_dim):
                raise ValueError(f"item_text has shape {tuple(text.shape)}, expected ({spec.n_items}, {spec.text_dim})")
            mean, w = whitening(text)
            self.register_buffer("item_text", (text - mean) @ w, persistent=True)
            self.adaptor = text_adaptor(spec.text_dim, spec.adaptor_hidden, d)
        else:
            self.adaptor = None
        self.position = nn.Embedding(spec.max_history, d)
        nn.init.normal_(self.position.weight, std=0.02)
        self.norm_in, self.norm_out = nn.LayerNorm(d), nn.LayerNorm(d)
        # the user vector of an empty history (a shopper with no click yet: CTR impressions have them)
        self.cold = nn.Parameter(torch.randn(d) * 0.02)
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(CausalBlock(d, spec.heads, spec.dropout) for _ in range(spec.layers))

    def item_vectors(self) -> torch.Tensor:
        """[n_items, D]: ID embedding + adapted text embedding (rows 0 and 1 included)."""
        out = self.item.weight if self.item is not None else 0
        if self.adaptor is not None:
            out = out + self.adaptor(self.item_text)
        return out

    def states(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history [B, L] (L <= max_history, left-padded), items [n_items, D] -> [B, L, D], the
        user state after each position (rows of padding positions are zeros)."""
        b, length = history.shape
        if length > self.spec.max_history:
            history, length = history[:, -self.spec.max_history:], self.spec.max_history
        real = history != PAD
        x = self.norm_in(items[history] + self.position.weight[self.spec.max_history - length:])
        x = self.drop(x) * real.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()
        # a padding query may attend to itself: a row with no key at all would give NaN
        mask = ((causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=history.device))[:, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm_out(x) * real.unsqueeze(-1)

    def user_vectors(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, D], the state after the most recent item (a learned vector for an empty history)."""
        last = self.states(history, items)[:, -1]
        empty = (history[:, -self.spec.max_history:] == PAD).all(1, keepdim=True)
        return torch.where(empty, self.cold.to(last.dtype), last)

    def rec_scores(self, history: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, L] -> [B, n_items] dot-product scores; padding and unknown get -inf."""
        items = self.item_vectors() if items is None else items
        scores = self.user_vectors(history, items) @ items.T
        scores[:, :2] = float("-inf")
        return scores


class NextItemLoss(nn.Module):
    """Next-item cross entropy at every position of a batch of sequences.

    forward(states [B, L, D], targets [B, L] (0 = no target there), items [V, D]) -> scalar mean
    over the positions with a target. Full softmax over the catalogue (ids >= 2) when
    `num_negatives` is 0 or not below the catalogue size; otherwise a sampled softmax: one set of
    `num_negatives` items drawn with replacement from `proposal` (a [V] probability vector, e.g.
    item popularity) shared by the batch, every logit (target and negatives) corrected by
    -log(num_negatives * q(item)), and a negative equal to the row's target masked out.
    """

    def __init__(self, num_negatives: int = 0, proposal: torch.Tensor | None = None):
        super().__init__()
        self.num_negatives = num_negatives
        if num_negatives:
            if proposal is None:
                raise ValueError("a sampled softmax needs a proposal distribution over the items")
            q = proposal.double().clone()
            q[:2] = 0
            self.proposal = (q / q.sum()).float().cpu()  # sampled on the CPU with the caller's generator

    def forward(self, states: torch.Tensor, targets: torch.Tensor, items: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        keep = targets != PAD
        h, y = states[keep], targets[keep]
        if not len(y):
            return states.sum() * 0.0
        if not self.num_negatives or self.num_negatives >= items.shape[0] - 2:
            logits = h @ items.T
            logits[:, :2] = float("-inf")
            return F.cross_entropy(logits, y)
        neg = torch.multinomial(self.proposal, self.num_negatives, replacement=True, generator=generator)
        neg = neg.to(items.device)
        log_mq = torch.log(self.num_negatives * self.proposal).to(items.device)
        pos_logit = (h * items[y]).sum(-1) - log_mq[y]
        neg_logit = h @ items[neg].T - log_mq[neg]
        neg_logit = neg_logit.masked_fill(neg[None, :] == y[:, None], float("-inf"))
        logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=logits.device))
