"""vae.cluster.launcher's exit code comes from what the training processes recorded, whichever way accelerate's launch
reports a worker's non-zero exit: 1.15 lets torchrun's ChildFailedError through, 1.16 (with --quiet) prints it
and exits 1. Both are played here by a stand-in for accelerate's launch_command that writes the records the
real workers write; the real two-process launches are in test_slurm.py and test_faults.py."""

import sys

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from vae.cluster import launcher
from vae.cluster.exit_records import RECORDS_DIR_ENV, read_exits, record_exit

LAUNCH_ARGS = ["--multi_gpu", "--num_processes", "2", "train.py", "--config", "configs/debug.yaml"]


def raise_child_failed(codes):
    failures = {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="")
                for rank, code in enumerate(codes) if code != 0}
    raise ChildFailedError(name="train.py", failures=failures)


def print_and_exit_1(codes):
    print("train.py FAILED (torchrun's failure block)", file=sys.stderr)
    sys.exit(1)


BEHAVIOURS = {"accelerate 1.15: ChildFailedError": raise_child_failed, "accelerate 1.16: prints, exits 1":
              print_and_exit_1}


def launch_with(monkeypatch, report, codes, recorded):
    """vae.cluster.launcher.main with accelerate's launch replaced: the workers exit with `codes`, those of `recorded`
    ranks having written their record (a worker killed or crashed writes none); then `report` plays accelerate."""
    import accelerate.commands.launch

    def launch_command(args):
        for rank in recorded:
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(len(codes)))
            record_exit(codes[rank])
        if any(codes):
            report(codes)

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", launch_command)
    monkeypatch.delenv(RECORDS_DIR_ENV, raising=False)
    return launcher.main(LAUNCH_ARGS)


@pytest.mark.parametrize("report", BEHAVIOURS.values(), ids=BEHAVIOURS.keys())
@pytest.mark.parametrize("code", [130, 138, 140, 143])
def test_a_planned_stop_of_every_process_is_the_launchers_exit_code_in_one_line(monkeypatch, capsys, report, code):
    assert launch_with(monkeypatch, report, [code, code], recorded=[0, 1]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"launcher: the training processes stopped as planned (exit code {code})")


@pytest.mark.parametrize("report", BEHAVIOURS.values(), ids=BEHAVIOURS.keys())
@pytest.mark.parametrize("codes, recorded", [([143, 1], [0, 1]),  # one failed: not a planned stop
                                              ([143, 143], [0]),  # rank 1 killed before it could record
                                              ([138, 143], [0, 1])])  # two different stops
def test_anything_else_keeps_accelerates_own_report(monkeypatch, capsys, report, codes, recorded):
    with pytest.raises((ChildFailedError, SystemExit)) as raised:
        launch_with(monkeypatch, report, codes, recorded)
    assert raised.type is (ChildFailedError if report is raise_child_failed else SystemExit)
    assert "stopped as planned" not in capsys.readouterr().err


def test_a_finished_launch_exits_0_and_leaves_no_records_folder(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert launch_with(monkeypatch, raise_child_failed, [0, 0], recorded=[0, 1]) == 0
    assert list(tmp_path.iterdir()) == []


def test_records_are_written_only_under_the_launcher_and_read_in_rank_order(monkeypatch, tmp_path):
    monkeypatch.delenv(RECORDS_DIR_ENV, raising=False)
    record_exit(143)  # python train.py: nothing to write, nowhere
    monkeypatch.setenv(RECORDS_DIR_ENV, str(tmp_path))
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        record_exit(140)
    (tmp_path / "rank-7.json").write_text("{cut by a kill")
    assert read_exits(tmp_path) == [{"rank": 0, "exit_code": 140, "local_world_size": 2},
                                    {"rank": 1, "exit_code": 140, "local_world_size": 2}]
