"""The Python backend through a real server: Triton's model.py files run unchanged, a batch reaches
``execute`` as a list of requests, and a request's failure (an exception, an error response, a
malformed answer) stays with that request."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from testmodels import write_python_model

from rapidserve import Client, InferenceServerError
from rapidserve.engines.base import may_run_inline

pytestmark = pytest.mark.timeout(120)

GATE = "rapidserve_test_gate"  # a module the test registers: the models in this process reach it by import

# x FP32 [batch, 4] -> y = 2x, count = how many requests the execute call that answered it had.
# The first execute call waits for the gate, so the requests sent meanwhile queue up into one batch.
GATED = """
    import numpy as np
    import triton_python_backend_utils as pb_utils
    import rapidserve_test_gate as gate


    class TritonPythonModel:
        def execute(self, requests):
            gate.sizes.append(len(requests))
            if len(gate.sizes) == 1:
                gate.entered.set()
                gate.release.wait(60)
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
                if x.min() < 0:
                    if gate.on_negative == "raise":
                        raise ValueError(f"a negative input: {x.min()}")
                    code = pb_utils.TritonError.INVALID_ARG if gate.on_negative == "invalid" else pb_utils.TritonError.INTERNAL
                    error = pb_utils.TritonError(f"no negatives here, got {x.min()}", code)
                    responses.append(pb_utils.InferenceResponse(error=error))
                    continue
                count = np.full((x.shape[0], 1), len(requests), np.int32)
                tensors = [pb_utils.Tensor("y", x * 2), pb_utils.Tensor("count", count)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            return responses
"""
GATED_CONFIG = """max_batch_size: 8
input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [4] }, { name: "count" data_type: TYPE_INT32 dims: [1] }]
dynamic_batching {}
"""


@pytest.fixture
def gate() -> Iterator[Any]:
    module = types.ModuleType(GATE)
    module.entered, module.release = threading.Event(), threading.Event()  # type: ignore[attr-defined]
    module.sizes, module.on_negative = [], "raise"  # type: ignore[attr-defined]
    sys.modules[GATE] = module
    yield module
    module.release.set()  # type: ignore[attr-defined]
    del sys.modules[GATE]


Outcome = dict[str, np.ndarray] | InferenceServerError


def call(url: str, model: str, inputs: dict[str, np.ndarray]) -> Outcome:
    with Client(url) as client:
        try:
            return client.infer(model, inputs)
        except InferenceServerError as exc:
            return exc


def in_one_batch(server: Any, gate: Any, model: str, requests: list[dict[str, np.ndarray]]) -> list[Outcome]:
    """Hold the model's only instance with a first request, queue ``requests`` behind it, then let
    everything run: the queued requests reach the model as one batch. Returns their outcomes."""
    outcomes: list[Outcome | None] = [None] * (len(requests) + 1)

    def run(index: int, inputs: dict[str, np.ndarray]) -> None:
        outcomes[index] = call(server.url, model, inputs)

    first = threading.Thread(target=run, args=(0, {"x": np.ones((1, 4), np.float32)}))
    first.start()
    assert gate.entered.wait(30), "the first request never reached execute"
    threads = [threading.Thread(target=run, args=(i + 1, r)) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    version = server.server.manager.get(model)
    deadline = time.monotonic() + 30
    while version.pending_requests < len(requests):
        assert time.monotonic() < deadline, f"only {version.pending_requests} of {len(requests)} requests queued"
        time.sleep(0.005)
    gate.release.set()
    for thread in (first, *threads):
        thread.join(30)
    assert isinstance(outcomes[0], dict), outcomes[0]
    return outcomes[1:]  # type: ignore[return-value]


def rows(*values: float) -> list[dict[str, np.ndarray]]:
    return [{"x": np.full((1, 4), v, np.float32)} for v in values]


def test_answers_equal_numpys(tmp_path: Path, serve) -> None:
    write_python_model(
        tmp_path,
        "add_sub",
        """
        import json
        import triton_python_backend_utils as pb_utils


        class TritonPythonModel:
            def initialize(self, args):
                config = json.loads(args["model_config"])
                self.dtype = pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, "OUTPUT0")["data_type"])

            def execute(self, requests):
                responses = []
                for request in requests:
                    a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                    b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
                    out = [pb_utils.Tensor("OUTPUT0", (a + b).astype(self.dtype)), pb_utils.Tensor("OUTPUT1", a - b)]
                    responses.append(pb_utils.InferenceResponse(output_tensors=out))
                return responses
        """,
        """max_batch_size: 8
        input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [16] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [16] }]
        output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [16] }, { name: "OUTPUT1" data_type: TYPE_FP32 dims: [16] }]
        """,
    )
    server = serve(tmp_path)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 16)).astype(np.float32)
    with Client(server.url) as client:
        got = client.infer("add_sub", {"INPUT0": a, "INPUT1": b})
        np.testing.assert_array_equal(got["OUTPUT0"], a + b)
        np.testing.assert_array_equal(got["OUTPUT1"], a - b)
        assert client.infer("add_sub", {"INPUT0": a, "INPUT1": b}, ["OUTPUT1"]).keys() == {"OUTPUT1"}
        assert client.model_config("add_sub").backend == "python"


def test_a_batch_reaches_execute_as_a_list_of_requests(tmp_path: Path, serve, gate) -> None:
    write_python_model(tmp_path, "gated", GATED, GATED_CONFIG)
    server = serve(tmp_path)
    outcomes = in_one_batch(server, gate, "gated", rows(1, 2, 3))
    assert gate.sizes == [1, 3]
    for value, outcome in zip((1, 2, 3), outcomes, strict=True):
        assert isinstance(outcome, dict), outcome
        np.testing.assert_array_equal(outcome["y"], np.full((1, 4), 2 * value, np.float32))
        assert outcome["count"].tolist() == [[3]]
    with Client(server.url) as client:
        stats = client.model_statistics("gated").model_stats[0]
        assert stats.execution_count == 2 and stats.inference_count == 4


def test_an_exception_in_execute_fails_only_its_own_request(tmp_path: Path, serve, gate) -> None:
    write_python_model(tmp_path, "gated", GATED, GATED_CONFIG)
    server = serve(tmp_path)
    good, bad = in_one_batch(server, gate, "gated", rows(5, -1))
    assert gate.sizes == [1, 2, 1, 1]  # the batch that raised ran again in halves
    assert isinstance(good, dict), good
    np.testing.assert_array_equal(good["y"], np.full((1, 4), 10, np.float32))
    assert isinstance(bad, InferenceServerError)
    assert bad.code == grpc.StatusCode.INTERNAL
    assert "ValueError" in bad.message and "a negative input: -1.0" in bad.message, bad.message


@pytest.mark.parametrize(("kind", "code"), [("error", "INTERNAL"), ("invalid", "INVALID_ARGUMENT")])
def test_an_error_response_fails_only_its_request_with_its_message(
    kind: str, code: str, tmp_path: Path, serve, gate
) -> None:
    write_python_model(tmp_path, "gated", GATED, GATED_CONFIG)
    server = serve(tmp_path)
    gate.on_negative = kind
    bad, good = in_one_batch(server, gate, "gated", rows(-3, 4))
    assert gate.sizes == [1, 2]  # answered in one call: nothing ran again
    assert isinstance(good, dict), good
    np.testing.assert_array_equal(good["y"], np.full((1, 4), 8, np.float32))
    assert good["count"].tolist() == [[2]]
    assert isinstance(bad, InferenceServerError)
    assert bad.code == getattr(grpc.StatusCode, code)
    assert "no negatives here, got -3.0" in bad.message, bad.message


ARGS_MODEL = """
    import json
    import threading
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            self.args = json.dumps(args).encode()

        def execute(self, requests):
            responses = []
            for request in requests:
                text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
                echo = np.array([item[::-1] for item in text], dtype=np.object_)
                thread = np.array([threading.current_thread().name.encode()], dtype=np.object_)
                args = np.array([self.args], dtype=np.object_)
                out = [pb_utils.Tensor("echo", echo), pb_utils.Tensor("args", args), pb_utils.Tensor("thread", thread)]
                responses.append(pb_utils.InferenceResponse(out))
            return responses

        def finalize(self):
            folder = json.loads(self.args)["model_repository"]
            with open(folder + "/finalized", "a") as file:
                file.write("finalized\\n")
"""
ARGS_CONFIG = """max_batch_size: 0
input [{ name: "text" data_type: TYPE_STRING dims: [-1] }]
output [{ name: "echo" data_type: TYPE_STRING dims: [-1] },
        { name: "args" data_type: TYPE_STRING dims: [1] }, { name: "thread" data_type: TYPE_STRING dims: [1] }]
"""


def test_args_are_what_triton_passes_and_bytes_pass_through(tmp_path: Path, serve) -> None:
    folder = write_python_model(tmp_path, "echo", ARGS_MODEL, ARGS_CONFIG)
    server = serve(tmp_path)
    text = np.array([b"abc", b"\x00\xff rapid", b""], dtype=np.object_)
    with Client(server.url) as client:
        got = client.infer("echo", {"text": text})
    assert got["echo"].tolist() == [b"cba", b"dipar \xff\x00", b""]
    args = json.loads(got["args"][0])
    assert all(isinstance(value, str) for value in args.values())
    assert args["model_name"] == "echo" and args["model_version"] == "1"
    assert args["model_repository"] == str(folder)
    assert args["model_instance_kind"] == "CPU" and args["model_instance_device_id"] == "0"
    assert args["model_instance_name"] == "echo_0"
    config = json.loads(args["model_config"])
    assert config["name"] == "echo" and config["backend"] == "python"
    (text_input,) = config["input"]
    assert {k: text_input[k] for k in ("name", "data_type", "dims")} == {
        "name": "text",
        "data_type": "TYPE_STRING",
        "dims": [-1],
    }
    assert config["max_batch_size"] == 0 and text_input["optional"] is False  # every field, as Triton prints
    assert [o["name"] for o in config["output"]] == ["echo", "args", "thread"]


THREAD_MODEL = """
    import threading
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            name = threading.current_thread().name.encode()
            responses = []
            for request in requests:
                rows = request.inputs()[0].as_numpy().shape[0]
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("thread", np.full((rows, 1), name, object))]))
            return responses
"""


def test_execute_never_runs_on_the_event_loop(tmp_path: Path, serve) -> None:
    """A fast numeric model with one CPU instance: what the batcher runs inline, were it not a Python model."""
    config = 'max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_INT64 dims: [2] }]\n'
    config += 'output [{ name: "thread" data_type: TYPE_STRING dims: [1] }]\n'
    write_python_model(tmp_path, "threads", THREAD_MODEL, config)
    server = serve(tmp_path)

    async def current() -> str:
        return threading.current_thread().name

    loop_thread = server.run(current())
    x = np.zeros((1, 2), np.int64)
    with Client(server.url) as client:
        threads = {client.infer("threads", {"x": x})["thread"][0, 0].decode() for _ in range(50)}
    assert threads and loop_thread not in threads
    assert may_run_inline(["cpu"]) and not may_run_inline(["cpu"], "python")


def test_finalize_is_called_on_unload(tmp_path: Path, serve) -> None:
    folder = write_python_model(tmp_path, "echo", ARGS_MODEL, ARGS_CONFIG)
    server = serve(tmp_path, model_control_mode="explicit", load_models=("*",))
    with Client(server.url) as client:
        assert client.infer("echo", {"text": np.array([b"x"], dtype=np.object_)})["echo"].tolist() == [b"x"]
        assert not (folder / "finalized").exists()
        client.unload_model("echo")
    assert (folder / "finalized").read_text() == "finalized\n"


SCALER = """
    import triton_python_backend_utils as pb_utils

    FACTOR = {factor}


    class TritonPythonModel:
        def execute(self, requests):
            return [
                pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * FACTOR)])
                for r in requests
            ]
"""
SCALER_CONFIG = """max_batch_size: 4
input [{ name: "x" data_type: TYPE_INT64 dims: [2] }]
output [{ name: "y" data_type: TYPE_INT64 dims: [2] }]
instance_group [{ count: 2 kind: KIND_CPU }]
"""


def test_two_models_with_model_py_do_not_clash(tmp_path: Path, serve) -> None:
    write_python_model(tmp_path, "double", SCALER.format(factor=2), SCALER_CONFIG)
    write_python_model(tmp_path, "triple", SCALER.format(factor=3), SCALER_CONFIG)
    server = serve(tmp_path, model_control_mode="explicit", load_models=("*",))
    x = np.array([[1, 2]], np.int64)
    with Client(server.url) as client:
        for _ in range(3):
            assert client.infer("double", {"x": x})["y"].tolist() == [[2, 4]]
            assert client.infer("triple", {"x": x})["y"].tolist() == [[3, 6]]
        (tmp_path / "double" / "1" / "model.py").write_text(textwrap.dedent(SCALER.format(factor=5)))
        client.load_model("double")  # a reload imports the new file afresh
        assert client.infer("double", {"x": x})["y"].tolist() == [[5, 10]]
        assert client.infer("triple", {"x": x})["y"].tolist() == [[3, 6]]


HELPED = """
    import triton_python_backend_utils as pb_utils

    from .helper import FACTOR


    class TritonPythonModel:
        def initialize(self, args):
            pb_utils.Logger.log_info(f"{args['model_name']} multiplies by {FACTOR}")

        def execute(self, requests):
            return [
                pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * FACTOR)])
                for r in requests
            ]
"""


def test_files_beside_model_py_import_relatively_per_model_and_nothing_is_written(
    tmp_path: Path, serve, caplog: pytest.LogCaptureFixture
) -> None:
    for name, factor in (("seven", 7), ("eleven", 11)):
        folder = write_python_model(tmp_path, name, HELPED, SCALER_CONFIG)
        (folder / "1" / "helper.py").write_text(f"FACTOR = {factor}\n")
    before = sorted(tmp_path.rglob("*"))
    with caplog.at_level("INFO", logger="rapidserve.models"):
        server = serve(tmp_path)
    x = np.array([[1, 2]], np.int64)
    with Client(server.url) as client:
        assert client.infer("seven", {"x": x})["y"].tolist() == [[7, 14]]
        assert client.infer("eleven", {"x": x})["y"].tolist() == [[11, 22]]
    assert sorted(tmp_path.rglob("*")) == before  # no __pycache__ in the operator's repository
    logged = [r.getMessage() for r in caplog.records if r.name == "rapidserve.models"]
    assert logged.count("seven multiplies by 7") == 2 and logged.count("eleven multiplies by 11") == 2  # 2 instances


def load_error(server: Any, name: str) -> InferenceServerError:
    with Client(server.url) as client, pytest.raises(InferenceServerError) as info:
        client.load_model(name)
    return info.value


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import numpy\nFACTOR = 1 / 0\n", "ZeroDivisionError: division by zero (line 2)"),
        ("class TritonPythonModel(:\n    pass\n", "SyntaxError"),
        ("import numpy\n", "defines no class TritonPythonModel"),
        ("import sys\nsys.exit(2)\n", "SystemExit: 2 (line 2)"),
        (
            "class TritonPythonModel:\n    def initialize(self, args):\n        raise KeyError('weights')\n"
            "    def execute(self, requests):\n        return []\n",
            "KeyError: 'weights' (line 3)",
        ),
    ],
)
def test_a_model_py_that_fails_to_load_names_its_file(source: str, expected: str, tmp_path: Path, serve) -> None:
    write_python_model(tmp_path, "broken", source, GATED_CONFIG)
    server = serve(tmp_path, model_control_mode="explicit")
    error = load_error(server, "broken")
    assert "broken/1/model.py" in error.message and expected in error.message, error.message


def test_a_model_py_without_a_config_is_told_it_needs_one(tmp_path: Path, serve) -> None:
    (tmp_path / "bare" / "1").mkdir(parents=True)
    (tmp_path / "bare" / "1" / "model.py").write_text(textwrap.dedent(SCALER.format(factor=2)))
    server = serve(tmp_path, model_control_mode="explicit")
    error = load_error(server, "bare")
    assert "bare/1/model.py" in error.message and "config.pbtxt" in error.message, error.message


SLOPPY = """
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
                mode = int(x[0, 0])
                if mode == 1:
                    return []
                if mode == 6:
                    raise SystemExit(3)
                tensors = {
                    0: [pb_utils.Tensor("y", x * 2)],
                    2: [pb_utils.Tensor("z", x)],
                    3: [pb_utils.Tensor("y", np.ones((x.shape[0], 5), np.float32))],
                    4: [pb_utils.Tensor("y", np.array([["a"] * 4] * x.shape[0]))],
                    5: [pb_utils.Tensor("y", (x * 2).astype(np.float64))],
                }[mode]
                responses.append(pb_utils.InferenceResponse(tensors))
            return responses
"""
SLOPPY_CONFIG = """max_batch_size: 8
input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [4] }]
"""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (1, "execute returned 0 responses for 1 requests"),
        (2, "no output 'y' (it has: z)"),
        (3, "output 'y' has shape [1, 5] but the config expects [1, 4]"),
        (4, "output 'y' is"),
        (6, "execute raised SystemExit: 3"),
    ],
)
def test_a_malformed_answer_is_an_internal_error_saying_what_was_expected(
    mode: int, expected: str, tmp_path: Path, serve
) -> None:
    write_python_model(tmp_path, "sloppy", SLOPPY, SLOPPY_CONFIG)
    server = serve(tmp_path)
    x = np.full((1, 4), mode, np.float32)
    with Client(server.url) as client:
        with pytest.raises(InferenceServerError) as info:
            client.infer("sloppy", {"x": x})
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "sloppy" in info.value.message and expected in info.value.message, info.value.message
        np.testing.assert_array_equal(client.infer("sloppy", {"x": np.zeros((2, 4), np.float32)})["y"], 0)
        # a float64 answer whose values fit is cast to the config's FP32, as for every backend
        got = client.infer("sloppy", {"x": np.full((1, 4), 5, np.float32)})["y"]
        assert got.dtype == np.float32 and got.tolist() == [[10.0] * 4]


def test_the_readme_example_runs_as_written(tmp_path: Path, serve) -> None:
    import contextlib
    import io
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("### Python backend")
    section = readme[start : readme.index("\n### ", start + 1)]
    config, model, client = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)
    assert config.startswith("# shout/config.pbtxt") and model.startswith("# shout/1/model.py")
    (tmp_path / "shout" / "1").mkdir(parents=True)
    (tmp_path / "shout" / "config.pbtxt").write_text(config)
    (tmp_path / "shout" / "1" / "model.py").write_text(model)
    server = serve(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(client.replace("localhost:8001", server.url), {})  # the README's own snippet
    expected = re.search(r"# (\[\[b'HELLO'.*)", client)
    assert expected is not None and printed.getvalue().strip() == expected.group(1).strip()


IN_PLACE = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
                x *= 3  # models may work on their inputs in place, as Triton's are writable
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]))
            return responses
"""


@pytest.mark.frontends(1, 2)
def test_inputs_are_writable_as_in_triton(tmp_path: Path, serve, frontends: int) -> None:
    io = 'input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]\noutput [{ name: "y" data_type: TYPE_FP32 dims: [4] }]\n'
    write_python_model(tmp_path, "triple", IN_PLACE, f"max_batch_size: 8\n{io}")
    server = serve(tmp_path)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with Client(server.url) as client:
        np.testing.assert_array_equal(client.infer("triple", {"x": x})["y"], x * 3)
