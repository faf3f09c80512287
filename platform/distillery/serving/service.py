"""What the API answers, with no Ray and no HTTP in it: item ids in and out, unknown ids listed,
cold starts, explanations, and every call batched (a list of requests in, a list of answers out),
as `@serve.batch` hands them over.

The model side is any `runtime` with the methods `StudentRuntime` has (`histories`, `users`,
`rec_from_users`, `ctr_from_users`, `text_logits`), so the serve benchmark can put the teacher
behind the very same code.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..data.examples import text_or_none
from ..models.student import StudentSpec

EXPLAIN_TOP = 5
# Occlusion costs one text per word: capped, so that 256 long texts stay a bounded request. The
# student reads at most 64 word pieces, so later words weigh little anyway.
MAX_OCCLUDED_WORDS = 64


class Service:
    def __init__(self, runtime, items, *, labels: dict[str, list[str]], card: dict):
        """`items`: the bundle's catalogue (idx, item_id, title, category, clicks); `labels`: each
        text classification task's class names."""
        self.rt, self.labels, self.card = runtime, {t: list(v) for t, v in labels.items()}, card
        items = items.sort_values("idx")
        size = int(items["idx"].max()) + 1
        self.index = dict(zip(items["item_id"].astype(str), items["idx"].astype(int)))
        self.item_ids = np.full(size, "", dtype=object)
        self.titles = np.full(size, "", dtype=object)
        self.item_ids[items["idx"]] = items["item_id"].astype(str).to_numpy()
        self.titles[items["idx"]] = [text_or_none(t) or "" for t in items["title"]]
        by_clicks = items.sort_values(["clicks", "idx"], ascending=[False, True], kind="stable")
        self.popular = by_clicks["idx"].to_numpy()
        self.popular_clicks = by_clicks["clicks"].to_numpy()
        # a missing title or category is "" (pandas reads it back as NaN, which must not become "nan")
        self.catalogue = [{"item_id": str(i), "title": text_or_none(t) or "", "category": text_or_none(c) or ""}
                          for i, t, c in zip(items["item_id"], items["title"], items["category"])]

    @classmethod
    def from_bundle(cls, path: str) -> "Service":
        from . import bundle
        from .runtime import StudentRuntime

        b = bundle.load(path)
        return cls(StudentRuntime(b.model, b.tokenizer, b.spec), b.items, labels=dict(b.spec.classes),
                   card=model_card(b.spec, b.config, b.manifest, b.metrics, len(b.items)))

    # ---- ids
    def _known(self, ids: list[str]) -> tuple[list[int], list[str]]:
        known, unknown = [], []
        for i in ids:
            idx = self.index.get(i)
            if idx is None:
                unknown.append(i)
            else:
                known.append(idx)
        return known, list(dict.fromkeys(unknown))

    def _explain(self, used: list[int], weights: torch.Tensor) -> list[dict]:
        """Pooling weights over a right-aligned history row -> the history items that weighed most
        (an item seen twice adds its weights)."""
        per_item: dict[int, float] = {}
        for idx, w in zip(used, weights[len(weights) - len(used):].tolist()):
            per_item[idx] = per_item.get(idx, 0.0) + w
        top = sorted(per_item.items(), key=lambda kv: -kv[1])[:EXPLAIN_TOP]
        return [{"item_id": self.item_ids[i], "title": self.titles[i], "weight": round(w, 6)} for i, w in top]

    def _users(self, histories: list[list[int]], length: int):
        """Known-id histories, the most recent `length` items of each -> (users, pooling weights,
        the ids each row used)."""
        used = [h[-length:] for h in histories]
        users, weights = self.rt.users(self.rt.histories(used, length))
        return users, weights, used

    # ---- tasks
    @torch.inference_mode()
    def recommend(self, requests: list[dict]) -> list[dict]:
        parsed = [self._known(r["history"]) for r in requests]
        out: list[dict | None] = [None] * len(requests)
        warm = [i for i, (known, _) in enumerate(parsed) if known]
        if warm:
            users, weights, used = self._users([parsed[i][0] for i in warm], self.rt.rec_history)
            scores = self.rt.rec_from_users(users)
            for row, i in enumerate(warm):
                r, (known, unknown) = requests[i], parsed[i]
                s = scores[row]
                if r.get("exclude_history", True):
                    s[torch.as_tensor(known)] = float("-inf")
                top = torch.topk(s, min(r["k"], s.shape[0]))
                items = [{"item_id": self.item_ids[j], "title": self.titles[j], "score": round(v, 6)}
                         for v, j in zip(top.values.tolist(), top.indices.tolist()) if v > float("-inf")]
                out[i] = {"items": items, "cold_start": False, "unknown_ids": unknown,
                          "explanation": self._explain(used[row], weights[row]) if r.get("explain") else None}
        for i, r in enumerate(requests):
            if out[i] is None:  # no known history: the most clicked items
                n = min(r["k"], len(self.popular))
                items = [{"item_id": self.item_ids[j], "title": self.titles[j], "score": float(c)}
                         for j, c in zip(self.popular[:n], self.popular_clicks[:n])]
                out[i] = {"items": items, "cold_start": True, "unknown_ids": parsed[i][1],
                          "explanation": [] if r.get("explain") else None}
        return out

    @torch.inference_mode()
    def ctr(self, requests: list[dict]) -> list[dict]:
        histories, candidates, slots, unknown = [], [], [], []
        for r in requests:
            known, missing = self._known(r["history"])
            wanted = r.get("slots") or [-1] * len(r["candidates"])
            cand = [(self.index.get(c), s) for c, s in zip(r["candidates"], wanted)]
            missing += [c for c, (idx, _) in zip(r["candidates"], cand) if idx is None]
            histories.append(known)
            candidates.append([idx for idx, _ in cand if idx is not None])
            slots.append([s for idx, s in cand if idx is not None])
            unknown.append(list(dict.fromkeys(missing)))
        users, weights, used = self._users(histories, self.rt.ctr_history)
        counts = torch.tensor([len(c) for c in candidates])
        flat = [c for cs in candidates for c in cs]
        probs = []
        if flat:
            logits = self.rt.ctr_from_users(users.repeat_interleave(counts, 0), torch.as_tensor(flat),
                                            torch.as_tensor([s for ss in slots for s in ss]))
            probs = torch.sigmoid(logits).tolist()
        out, at = [], 0
        for i, r in enumerate(requests):
            p = probs[at:at + len(candidates[i])]
            at += len(candidates[i])
            out.append({"predictions": [{"item_id": self.item_ids[c], "probability": round(v, 6)}
                                        for c, v in zip(candidates[i], p)],
                        "cold_start": not histories[i], "unknown_ids": unknown[i],
                        "explanation": self._explain(used[i], weights[i]) if r.get("explain") else None})
        return out

    @torch.inference_mode()
    def classify(self, task: str, requests: list[dict]) -> list[dict]:
        """A text classification task's answers: per text, the top class, the top 3 and (`explain`)
        the words that weighed most."""
        texts = [t for r in requests for t in r["texts"]]
        probs = torch.softmax(self.rt.text_logits(task, texts), -1)
        top_p, top_i = probs.topk(min(3, probs.shape[1]), -1)
        labels = self.labels[task]
        out, at = [], 0
        for r in requests:
            preds = []
            for row in range(at, at + len(r["texts"])):
                top = [{"label": labels[j], "probability": round(p, 6)}
                       for p, j in zip(top_p[row].tolist(), top_i[row].tolist())]
                preds.append({**top[0], "top": top,
                              "explanation": self._words(task, texts[row], int(top_i[row, 0]), float(top_p[row, 0]))
                              if r.get("explain") else None})
            at += len(r["texts"])
            out.append({"predictions": preds})
        return out

    def _words(self, task: str, text: str, label: int, p: float) -> list[dict]:
        """Occlusion: how far the label's probability falls when each word is left out. Exact for
        any model, and one batched call per text."""
        words = text.split()[:MAX_OCCLUDED_WORDS]
        if len(words) < 2:
            return [{"token": w, "weight": round(p, 6)} for w in words]
        variants = [" ".join(words[:j] + words[j + 1:]) for j in range(len(words))]
        drops = p - torch.softmax(self.rt.text_logits(task, variants), -1)[:, label]
        order = drops.argsort(descending=True)[:EXPLAIN_TOP].tolist()
        return [{"token": words[j], "weight": round(float(drops[j]), 6)} for j in order]

    def items(self, limit: int, offset: int) -> dict:
        return {"total": len(self.catalogue), "offset": offset, "limit": limit,
                "items": self.catalogue[offset:offset + limit]}


def model_card(spec: StudentSpec, config: dict, manifest: dict, metrics: dict, catalogue_size: int) -> dict:
    """GET /v1/model. The version is a digest of every file's hash: any change to the bundle changes it."""
    files = manifest["files"]
    digest = hashlib.sha256("".join(f"{n}:{f['sha256']}" for n, f in sorted(files.items())).encode()).hexdigest()
    return {"version": digest[:16], "created": manifest["created"], "distillery_version": manifest["distillery_version"],
            "variant": config.get("variant"), "source": config.get("source"), "weights": config.get("weights"),
            "tasks": list(spec.tasks), "classes": {t: list(v) for t, v in spec.classes.items()},
            "catalogue_size": catalogue_size, "metrics": metrics,
            "bundle": {name: {"sha256": f["sha256"], "bytes": f["bytes"]} for name, f in sorted(files.items())}}
