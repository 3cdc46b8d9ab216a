"""--report-to: every iteration's record reaches each tracker, read back from the tracker's own files (trackio's
SQLite store, W&B's offline run files, TensorBoard's event files) and equal to metrics.jsonl; a resumed run
continues the same tracker run; a tracker that is not installed is a one-line error before any work starts.
A tracker's tests skip, with the reason, where it is not installed (CI installs them from .ci/trackers.txt)."""

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vineppo  # noqa: E402
from test_training import TINY_RUN  # noqa: E402

INSTALLED = [name for name in vineppo.TRACKERS if importlib.util.find_spec(name)]


def numbers(record: dict) -> dict:
    return {key: value for key, value in record.items() if isinstance(value, (int, float))}


def read_trackio(out: Path) -> tuple[dict, dict]:
    """(iteration -> record, config) of the run named after the output directory, from trackio's local store."""
    from trackio.sqlite_storage import SQLiteStorage
    logs = SQLiteStorage.get_logs("vineppo", out.name)
    steps = [log["step"] for log in logs]
    assert len(steps) == len(set(steps)), f"an iteration logged twice: {steps}"
    records = {log["step"]: {k: v for k, v in log.items() if k not in ("step", "timestamp")} for log in logs}
    return records, SQLiteStorage.get_run_config("vineppo", out.name)


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (<run>.wandb): LevelDB's log format, 32 KiB blocks of chunks, each
    with a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last), after a 7-byte file header."""
    from wandb.proto.wandb_internal_pb2 import Record
    data, position, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb(out: Path) -> tuple[dict, dict]:
    """(iteration -> record, config) from W&B's offline run directories of the run id in <out>/wandb-run-id (a
    resumed run writes one more directory with the same id; `wandb sync` uploads them as one run)."""
    run_id = (out / "wandb-run-id").read_text().strip()
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert runs and len(runs) == len(list((out / "wandb").glob("offline-run-*"))), "another W&B run id was used"
    records, config = {}, {}
    for record in (r for path in runs for r in wandb_records(path)):
        if record.HasField("history"):
            step = record.history.step.num
            assert step not in records, f"iteration {step} logged twice"
            records[step] = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item if not (item.key or item.nested_key[0]).startswith("_")}
        if record.HasField("run") or record.HasField("config"):  # the config comes with the run, updates after it
            updates = record.run.config.update if record.HasField("run") else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    return records, config


def read_tensorboard(out: Path) -> tuple[dict, dict]:
    """(iteration -> record, config) from the event files in <out>/tensorboard, read as TensorBoard reads them
    (a resumed run's purge_step hides what was logged after the checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    records = {}
    for tag in events.Tags()["scalars"]:
        steps = [event.step for event in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: an iteration logged twice: {steps}"
        for event in events.Scalars(tag):
            records.setdefault(event.step, {})[tag] = event.value
    text = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    return records, json.loads(text.strip("`\n"))


READERS = {"trackio": read_trackio, "wandb": read_wandb, "tensorboard": read_tensorboard}


def read_back(out: Path) -> dict:
    """tracker -> what its reader returned, or the error it raised (the tracker's own test raises it)."""
    logged = {}
    for name in INSTALLED:
        try:
            logged[name] = READERS[name](out)
        except AssertionError as error:
            logged[name] = error
    return logged


def tracker_log(logged: dict, tracker: str) -> tuple[dict, dict]:
    pytest.importorskip(tracker, reason=f"{tracker} is not installed (pip install -r .ci/trackers.txt)")
    if isinstance(logged[tracker], AssertionError):
        raise logged[tracker]
    return logged[tracker]


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One tiny run of 1 iteration reporting to every installed tracker, read back; then resumed from its
    checkpoint to iteration 2, read back again."""
    if not INSTALLED:
        pytest.skip("no tracker installed (pip install -r .ci/trackers.txt)")
    base = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as patch:  # every tracker writes under the test's own directory, offline
        patch.setenv("TRACKIO_DIR", str(base / "trackio"))  # read once, when trackio is imported (by the run)
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(name, str(base / name.lower()))
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("TRACKIO_PROJECT", raising=False)
        patch.delenv("WANDB_PROJECT", raising=False)
        out = base / "tiny-run"
        vineppo.main(TINY_RUN + ["--iterations", "1", "--output-dir", str(out), "--report-to", ",".join(INSTALLED)])
        first = read_back(out), vineppo.read_metrics(str(out))
        vineppo.main(["--output-dir", str(out), "--resume", "--iterations", "2"])  # --report-to is kept
        second = read_back(out), vineppo.read_metrics(str(out))
    return first, second


def assert_same(logged: dict, metrics: list[dict], tracker: str) -> None:
    assert sorted(logged) == [r["iteration"] for r in metrics], f"{tracker}: iterations {sorted(logged)}"
    for record in metrics:
        assert logged[record["iteration"]] == pytest.approx(numbers(record), rel=1e-6), tracker  # TensorBoard: float32


@pytest.mark.parametrize("tracker", vineppo.TRACKERS)
def test_a_tiny_run_logs_what_metrics_jsonl_holds(reported, tracker):
    (logged, metrics), _ = reported
    records, config = tracker_log(logged, tracker)
    assert [r["iteration"] for r in metrics] == [0, 1]
    assert_same(records, metrics, tracker)
    assert {key: config.get(key) for key in ("critic", "iterations", "report_to", "lr")} == {
        "critic": "mc", "iterations": 1, "report_to": ",".join(INSTALLED), "lr": 1e-3}


@pytest.mark.parametrize("tracker", vineppo.TRACKERS)
def test_a_resumed_run_continues_the_same_tracker_run(reported, tracker):
    _, (logged, metrics) = reported
    assert [r["iteration"] for r in metrics] == [0, 1, 2]
    assert_same(tracker_log(logged, tracker)[0], metrics, tracker)  # one run holds 0, 1 and 2, each once


@pytest.mark.parametrize("tracker", vineppo.TRACKERS)
def test_a_tracker_not_installed_is_a_one_line_error_before_any_work(tmp_path, monkeypatch, capsys, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # what `import` and find_spec see when it is not installed
    with pytest.raises(SystemExit) as stop:
        vineppo.main(["--report-to", f"none,{tracker}", "--output-dir", str(tmp_path / "run")])
    assert stop.value.code == f"error: --report-to {tracker} needs the {tracker} package: pip install {tracker}"
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(SystemExit) as stop:
        vineppo.main(["--report-to", "wandb,mlflow", "--output-dir", str(tmp_path / "run")])
    assert "--report-to takes none or a comma-separated list of trackio, wandb, tensorboard; got 'mlflow'" in str(
        stop.value.code)
    assert not (tmp_path / "run").exists()
