"""Progress lines for output that is not a terminal (a cluster job's log): which steps get a line."""

from types import SimpleNamespace

import dsmoe.progress as progress


def test_a_line_every_n_steps_at_most_every_min_seconds_and_on_the_last(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    lines = progress.ProgressLines(every=5, tokens_per_step=100, min_seconds=30)
    trainer = SimpleNamespace(global_step=0, max_steps=20, is_global_zero=True, lightning_module=None)
    monkeypatch.setattr(lines, "get_metrics", lambda trainer, module: {"train/lm_loss": 2.5, "v_num": 0})
    lines.on_train_start(trainer, None)
    for step in range(1, 21):
        trainer.global_step, now[0] = step, 4.0 * step  # 4 s per optimizer step
        lines.on_train_batch_end(trainer, None)
        lines.on_train_batch_end(trainer, None)  # a second micro-batch of the same step: no second line
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out] == ["5/20", "15/20", "20/20"]  # step 10 came 20 s after step 5
    assert (
        out[0]
        == "[dsmoe.train] step 5/20 (25.0%), 500 tokens, lm_loss 2.5 | 25 tokens/s, 0:00:20 elapsed, 0:01:00 left"
    )
    trainer.is_global_zero = False  # the other ranks print nothing
    trainer.global_step = trainer.max_steps = 25
    lines.on_train_batch_end(trainer, None)
    assert capsys.readouterr().out == ""
