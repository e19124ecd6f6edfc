"""Test setup: tests/ on sys.path (hf_reference, serve_helpers, ...), and the markers registered
in pyproject.toml given here, so that no test file has to carry them:

    reference  tests that compare against transformers: their own source (or that of a fixture
               they take) runs a transformers model (mentions transformers or an `hf` object)
    compile    tests whose name or parametrization id says compile/compiled (they run torch.compile)
    slow       the tests SLOW names (over ~10 s, setup included, on 2 CPU cores)

e.g. `pytest -m "not slow and not compile and not reference"` for a quick development run. (Tiny
test checkpoints are built with transformers everywhere, so it stays a test dependency.)"""

import inspect
import re
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

# Node ids (a test, with all its parameters unless one is given, or a whole module's path) of the
# tests that took more than ~10 s (setup, call and teardown; a module's
# first test also pays for its module-scoped fixtures) in `pytest --durations=0` on a 2-core CPU.
# Re-measure with: .venv/bin/python -m pytest -q --durations=0 -p no:cacheprovider
SLOW: tuple[str, ...] = (  # seconds measured at d1ae4c2
    "tests/test_serve.py::test_fixed_shape_decode_serves_the_eager_answers[compiled]",  # 90
    "tests/test_default_next_model.py::test_reads_the_tiles_on_a_fresh_hires_set",  # 35
    "tests/test_loading_errors.py::test_cli_errors_exit_2_without_traceback",  # 32
    "tests/test_serve.py::test_cli_serve_defaults_and_errors",  # 15
    "tests/test_quant_cache.py::test_decode_logits_close_to_fp[kivi:bits=4,group=8,residual=16]",  # 14
    "tests/test_quant_cache.py::test_embedded_model_kivi4_decode_close_to_fp",  # 14
    "tests/test_parity.py::test_greedy_tokens_match_transformers[llama-rope-linear-theta]",  # 11
    "tests/test_checkpoint_limits.py::test_cli_refusals_are_fast_one_line_and_small",  # 7-20 (4 processes)
    "tests/test_speculate.py::test_speculation_in_the_compiled_mode_gives_the_plain_tokens",  # 30-74
    "tests/test_lmms_eval_cli.py",  # 98-112 (lmms-eval's CLI in subprocesses)
    "tests/test_ray_eval.py::test_ray_eval_equals_eval",  # 34-88 (a local Ray cluster)
    "tests/test_ray_eval.py::test_ray_sweep_equals_the_sweep",  # 60+ (three runs on a local Ray cluster)
    "tests/test_speculate.py::test_a_quantized_kv_cache_speculates_and_gives_its_plain_tokens",  # 170 for 6
    "tests/test_speculate_draft.py",  # 135 for 8
    "tests/test_serve_cache.py::test_cached_answers_equal_uncached",  # 15 each
)

_REFERENCE = re.compile(r"\btransformers\b|\bhf(_\w+)?\b")


def _compares_with_transformers(item) -> bool:
    """Whether the test's source, or that of a fixture of its module it takes, runs transformers."""
    fn = getattr(item, "function", None)
    if fn is None:
        return False
    sources = [fn]
    module = sys.modules.get(fn.__module__)
    for name in getattr(item, "fixturenames", ()):
        fixture = getattr(module, name, None)
        sources.append(getattr(fixture, "__wrapped__", fixture))
    for src in sources:
        try:
            if callable(src) and _REFERENCE.search(inspect.getsource(src)):
                return True
        except (OSError, TypeError):
            continue
    return False


def _slow(nodeid: str) -> bool:
    """Whether SLOW names this test: its whole module (a path), the test, or one of its parameters."""
    return any(nodeid == p or nodeid.startswith(p + ("::" if p.endswith(".py") else "[")) for p in SLOW)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _compares_with_transformers(item):
            item.add_marker(pytest.mark.reference)
        if "compile" in item.name.lower():
            item.add_marker(pytest.mark.compile)
        if _slow(item.nodeid):
            item.add_marker(pytest.mark.slow)
