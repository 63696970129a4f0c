"""What a run leaves on disk when things go wrong: the loss history survives kills and resumes, progress.json says
where it stands, leftovers of a killed save are cleaned, a second Ctrl-C cannot tear a checkpoint, and the file
records the batch size actually used."""

import json
import os
import signal

import pytest
from safetensors import safe_open

from sdlora.training.loop import ignoring_interrupts, resume_config, train

from .conftest import quick_config


def _steps(log_path):
    return [json.loads(line)["step"] for line in log_path.read_text().splitlines()]


def test_log_is_on_disk_at_each_checkpoint_and_resume_keeps_history_once(tmp_path, style_dir):
    out = tmp_path / "out"
    first = train(quick_config(style_dir, out, steps=12, save_every=4, interrupt_at_step=7))
    assert first.interrupted
    log = out / "train_log.jsonl"
    assert _steps(log) == list(range(1, 8))  # flushed at the checkpoints and on the interrupt
    # a kill after step 9 would have logged 8 and 9 past the last checkpoint: resume from step 4 replays them
    cfg, _ = resume_config({"steps": 12, "progress": False}, str(out / "checkpoints" / "step-000004"))
    train(cfg)
    assert _steps(log) == list(range(1, 13))  # each step once, in order
    progress = json.loads((out / "progress.json").read_text())
    assert progress["step"] == progress["total"] == 12 and progress["status"] == "done"


def test_stale_checkpoint_temp_folders_are_removed_on_the_next_run(tmp_path, style_dir):
    out = tmp_path / "out"
    train(quick_config(style_dir, out, steps=4, save_every=2, interrupt_at_step=3))
    stale = out / "checkpoints" / ".step-000004.tmp-12345"
    stale.mkdir()
    (stale / "training_state.pt").write_bytes(b"half written")
    cfg, _ = resume_config({"steps": 4, "progress": False}, str(out))
    train(cfg)
    assert not stale.exists()


def test_batch_size_larger_than_the_data_is_clamped_and_recorded(tmp_path, style_dir):
    warnings = []
    result = train(quick_config(style_dir, tmp_path / "out", steps=2, batch_size=64, buckets=False),
                   warn=warnings.append, info=lambda m: None)
    assert any("--batch-size 64 is larger than the 8 training images; using 8" in w for w in warnings)
    with safe_open(str(result.adapter), "pt") as f:
        meta = f.metadata()
    assert meta["ss_batch_size_per_device"] == "8" and meta["ss_total_batch_size"] == "8"


def test_output_that_is_a_file_is_refused_with_one_line(tmp_path, style_dir):
    from sdlora.errors import SdloraError

    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(SdloraError, match="is a file, not a folder"):
        train(quick_config(style_dir, target, steps=1))


def test_a_second_ctrl_c_while_saving_is_ignored():
    """Inside the block SIGINT is ignored (outside it would raise KeyboardInterrupt), and the handler comes back."""
    before = signal.getsignal(signal.SIGINT)
    with ignoring_interrupts():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
