"""The one per-worker setup every trainer shares (`training.run`), in a plain process: the model is
saved at each new best validation only, every validated epoch is reported with the job's metrics,
a restored checkpoint resumes the loop, and the history is written where the job says."""
import json

import pytest
import torch

from distillery import loop, training
from distillery.losses import ClassifierLoss


class Recording(training.LocalWorker):
    """A plain-process worker that keeps what it was handed, and restores `resume` when given."""

    def __init__(self, resume=None):
        super().__init__("cpu")
        self.reports, self.resume = [], resume

    def restore(self, model, optim, sched, part):
        if self.resume is None:
            return None
        model.load_state_dict(self.resume["model"])
        return json.loads(json.dumps(self.resume["state"]))

    def report(self, model, optim, sched, state, metrics):
        self.reports.append((state["part"], metrics, {k: v.clone() for k, v in model.state_dict().items()}))


def _job(tmp_path, scores, saved, epochs=6):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    scores = iter(scores)

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            loss = torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])
            return {"ce": loss, "total": loss}

    return training.Job(
        name="tiny", stage="test", model=model, loss=Loss(),
        optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        schedule=lambda optim: torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0),
        plan=loop.Plan(epochs=epochs, patience=2, seed=3),
        batches=lambda gen: [(x, y)] * 2,
        validate=lambda: (next(scores), {"toy": {"acc": 0.5}}),
        save=lambda: saved.append({k: v.clone() for k, v in model.state_dict().items()}),
        history=str(tmp_path / "history.json"),
        describe=lambda entry: f"acc={entry['valid']['toy']['acc']}",
        metrics=lambda valid: {"toy_acc": valid["toy"]["acc"]})


def test_a_job_saves_each_new_best_reports_every_epoch_and_writes_its_history(tmp_path, capfd):
    saved, worker = [], Recording()
    state = training.run(_job(tmp_path, [0.1, 0.4, 0.3, 0.35, 0.9], saved), worker)
    # best at the 2nd validation, then 2 without a better one: stopped after the 4th (0.9 never seen)
    assert [h["score"] for h in state["history"]] == [0.1, 0.4, 0.3, 0.35]
    assert len(saved) == 2 and torch.equal(saved[1]["weight"], worker.reports[1][2]["weight"])
    assert [(part, m["epoch"], m["valid_score"], m["best_score"], m["toy_acc"]) for part, m, _ in worker.reports] == \
        [("tiny", 1, 0.1, 0.1, 0.5), ("tiny", 2, 0.4, 0.4, 0.5), ("tiny", 3, 0.3, 0.4, 0.5), ("tiny", 4, 0.35, 0.4, 0.5)]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["score"] for h in history] == [0.1, 0.4, 0.3, 0.35] and set(history[0]["loss"]) == {"ce", "total"}
    out = capfd.readouterr().out  # progress lines go to the process's own stdout
    assert "[test] tiny epoch 2/6" in out and "acc=0.5  *best" in out and "[test] tiny: early stop" in out


def test_a_job_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(tmp_path):
    whole = training.run(_job(tmp_path / "a", [0.1, 0.2, 0.3], [], epochs=3), Recording())
    first = Recording()
    job = _job(tmp_path / "b", [0.1, 0.2, 0.3], [], epochs=3)
    job.plan = loop.Plan(epochs=2, patience=2, seed=3)  # stands in for a run killed after its second epoch
    cut = training.run(job, first)
    resumed = training.run(_job(tmp_path / "c", [0.3], [], epochs=3),
                           Recording(resume={"model": first.reports[-1][2], "state": cut}))
    assert [h["loss"]["total"] for h in resumed["history"]] == \
        pytest.approx([h["loss"]["total"] for h in whole["history"]], rel=1e-6)


def test_the_local_worker_trains_alone_on_its_device():
    worker = training.LocalWorker()
    loss = torch.nn.Linear(2, 2)
    assert (worker.rank, worker.world, worker.device.type) == (0, 1, "cpu") and worker.wrap(loss) is loss
    assert worker.restore(loss, None, None, "any") is None


def test_the_classifier_loss_is_cross_entropy_of_the_model_on_its_text_inputs():
    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return (input_ids * attention_mask).float()

    batch = {"input_ids": torch.tensor([[1, 2, 0], [0, 3, 1]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
             "label": torch.tensor([1, 2]), "ignored": torch.zeros(2)}
    out = ClassifierLoss(Toy())(batch)
    ref = torch.nn.functional.cross_entropy(torch.tensor([[1.0, 2, 0], [0, 3, 1]]), torch.tensor([1, 2]))
    assert set(out) == {"cross_entropy", "total"} and torch.allclose(out["total"], ref)


def test_best_is_the_highest_scoring_epoch_of_a_history_and_counts_the_epochs_run():
    history = [{"epoch": e, "score": s, "valid": {"toy": {"acc": s}}} for e, s in enumerate([0.1, 0.5, 0.3, 0.5])]
    best = training.Best.of(history)
    # the first of equal scores: a later tie is no new best
    assert (best.score, best.best_epoch, best.epochs_run, best.valid) == (0.5, 2, 4, {"toy": {"acc": 0.5}})
    assert best.to_json() == {"valid": {"toy": {"acc": 0.5}}, "score": 0.5, "best_epoch": 2, "epochs_run": 4}
