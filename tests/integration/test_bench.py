"""`rapidserve bench` against a real server: closed and open loops, unary and streaming, duplicates
that the cache answers, errors by status, and its CSV, JSON and plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from testmodels import ONNX_TYPES, scale_graph, write_model

from rapidserve.cli import main

pytestmark = pytest.mark.timeout(300)
FAST = ["--measurement-interval", "300", "--warmup-s", "0.2", "--stability-percentage", "1000", "--max-trials", "3",
        "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from conftest import ServerThread

    from rapidserve.server.settings import ServerSettings

    repo = tmp_path_factory.mktemp("bench")
    config = 'max_batch_size: 8\ndynamic_batching { }\nparameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
    write_model(repo, "scale", scale_graph("scale", ONNX_TYPES["FP32"], 2.0), config)
    write_model(
        repo, "cached", scale_graph("cached", ONNX_TYPES["FP32"], 2.0), config + "response_cache { enable: true }\n"
    )
    thread = ServerThread(
        ServerSettings(model_repositories=(repo,), host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0)
    )
    thread.start()
    yield thread
    thread.stop()


def rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_closed_loop_sweep_over_unary_and_stream_writes_every_column(server, tmp_path: Path, capsys) -> None:
    for streaming in ([], ["--streaming"]):
        out = tmp_path / f"sweep{len(streaming)}.csv"
        assert main(["bench", "scale", "--url", server.url, "--concurrency", "1,4", *streaming, *FAST,
                     "--out", str(out), "--plot", str(tmp_path / "plot.png")]) == 0  # fmt: skip
        with out.open() as f:
            table = list(csv.DictReader(f))
        assert [r["concurrency"] for r in table] == ["1", "4"]
        for row in table:
            assert float(row["infer_per_s"]) > 0 and json.loads(row["errors"]) == {}
            assert 0 < float(row["p50_ms"]) <= float(row["p99_ms"]) <= float(row["p999_ms"])
            assert float(row["server_avg_batch"]) >= 1 and float(row["server_compute_infer_us"]) > 0
        assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "ModelStreamInfer streams" in printed and "unary ModelInfer" in printed


def test_open_loop_keeps_the_offered_rate_and_batches_count_inferences(server, tmp_path: Path) -> None:
    out = tmp_path / "rate.json"
    assert main(["bench", "scale", "--url", server.url, "--request-rate", "200", "--poisson", "-b", "4", *FAST,
                 "--out", str(out)]) == 0  # fmt: skip
    (row,) = rows(out)
    assert row["mode"] == "request_rate" and row["request_rate"] == 200
    # Poisson arrivals over the last three 0.3 s windows: ~180 expected, sd ~13; the ceiling is five sd
    # above the offered rate, the floor half of it (a loaded machine answers late, not never)
    assert 100 < row["requests_per_s"] < 275 and row["infer_per_s"] == pytest.approx(4 * row["requests_per_s"])


@pytest.mark.parametrize("ratio", [0.0, 0.9])
def test_the_duplicate_ratio_is_what_the_cache_sees(server, tmp_path: Path, ratio: float) -> None:
    out = tmp_path / "dup.json"
    assert main(["bench", "cached", "--url", server.url, "--concurrency", "2", "--duplicate-ratio", str(ratio),
                 *FAST, "--out", str(out)]) == 0  # fmt: skip
    (row,) = rows(out)
    assert row["server_cache_hit_ratio"] == pytest.approx(ratio, abs=0.08)


def test_errors_are_counted_by_status_code(server, tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    # a shape the model refuses: every request fails INVALID_ARGUMENT, and none is counted as latency
    assert main(["bench", "scale", "--url", server.url, "--shape", "x:9,4", *FAST, "--out", str(out)]) == 0
    (row,) = rows(out)
    assert row["errors"].get("INVALID_ARGUMENT", 0) > 0 and row["requests_per_s"] == 0


def test_bad_arguments_say_what_is_wrong(server, capsys) -> None:
    assert main(["bench", "nope", "--url", server.url, *FAST]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["bench", "scale", "--url", server.url, "--duplicate-ratio", "1.5", *FAST]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_a_latency_bound_stops_the_sweep_and_names_the_best_level(server, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bound.json"
    assert main(["bench", "scale", "--url", server.url, "--request-rate", "50,100", "--max-p99-ms", "1000", *FAST,
                 "--out", str(out)]) == 0  # fmt: skip
    assert [r["met_p99_bound"] for r in rows(out)] == [True, True]
    assert "with p99 <= 1000 ms: 100" in capsys.readouterr().out
    assert main(["bench", "scale", "--url", server.url, "--request-rate", "50,100", "--max-p99-ms", "0.000001",
                 *FAST, "--out", str(out)]) == 0  # fmt: skip
    assert [r["met_p99_bound"] for r in rows(out)] == [False]  # the sweep stopped at the first rate
    assert "with p99 <= 1e-06 ms: none" in capsys.readouterr().out


def test_two_worker_processes_add_up(server, tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    assert main(["bench", "scale", "--url", server.url, "--request-rate", "200", "--workers", "2", *FAST,
                 "--out", str(out)]) == 0  # fmt: skip
    (row,) = rows(out)
    # the floor is half the offered rate, as above (a loaded machine answers late, not never)
    assert 100 < row["requests_per_s"] < 240 and row["errors"] == {}
