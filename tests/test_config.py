"""siglip_dola.config: one switch mechanism; unknown names and bad values fail loudly; override restores."""
import os
import subprocess
import sys

import pytest

from siglip_dola import config


def test_override_sets_and_restores_even_after_an_error():
    assert config.use_triton_scoring() and config.use_fused_pooling() and config.use_entry_norms()
    with pytest.raises(ZeroDivisionError):
        with config.override(triton_scoring=False, fused_pooling=False, num_warps=4):
            assert not config.use_triton_scoring() and not config.use_fused_pooling()
            assert config.pooling_launch()["num_warps"] == 4
            1 / 0
    assert config.use_triton_scoring() and config.use_fused_pooling() and config.pooling_launch()["num_warps"] == 8


@pytest.mark.parametrize("options, match", [
    (dict(triton=True), "unknown siglip_dola.config option 'triton'"),
    (dict(fused_pooling=1), "must be True or False"),
    (dict(num_warps=0), "must be an int >= 1"),
    (dict(target_programs=-1), "must be an int >= 0"),
    (dict(block_t=True), "must be an int"),
    (dict(block_t=24), "power of two >= 16"), (dict(block_t=8), "power of two >= 16"),
    (dict(num_warps=6), "power of two"),
])
def test_unknown_names_and_bad_values_fail_loudly(options, match):
    with pytest.raises(ValueError, match=match):
        config.set(**options)
    with pytest.raises(ValueError, match=match):
        with config.override(**options):
            pass
    assert config.get("num_warps") == 8 and config.use_fused_pooling()


def test_get_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid options"):
        config.get("side_stream")


def test_set_functions_change_the_value_until_set_back():
    config.set_entry_norms(False)
    try:
        assert not config.use_entry_norms()
    finally:
        config.set_entry_norms(True)
    assert config.use_entry_norms()


def _in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = ("from siglip_dola import config; "
            "print(config.use_fused_pooling(), config.use_triton_scoring(), config.triton_interpreted())")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


def test_environment_is_read_once_at_import():
    proc = _in_subprocess({"SIGLIP_DOLA_FUSED_POOLING": "0", "SIGLIP_DOLA_TRITON_SCORING": "on",
                           "TRITON_INTERPRET": "1"})
    assert proc.stdout.split() == ["False", "True", "True"], proc.stderr
    bad = _in_subprocess({"SIGLIP_DOLA_FUSED_POOLING": "maybe"})
    assert bad.returncode != 0 and "SIGLIP_DOLA_FUSED_POOLING must be one of" in bad.stderr


def test_stacking_knobs_from_the_environment():
    code = "from siglip_dola import config; print(config.pooling_launch())"

    def run(env: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                              check=False)
    proc = run({"SIGLIP_DOLA_STACKED_MAX_BATCH": "3", "SIGLIP_DOLA_STACKED_MAX_BATCH_GRAPHED": "2",
                "SIGLIP_DOLA_STACKED_ON_CPU": "yes"})
    assert "'stacked_max_batch': 3, 'stacked_max_batch_graphed': 2, 'stacked_on_cpu': True" in proc.stdout, proc.stderr
    for name, value in (("STACKED_MAX_BATCH", "-1"), ("STACKED_MAX_BATCH", "eight"), ("STACKED_ON_CPU", "2"),
                        ("STACKED_MAX_BATCH_GRAPHED", "one")):
        bad = run({f"SIGLIP_DOLA_{name}": value})
        assert bad.returncode != 0 and "ValueError" in bad.stderr and name.lower() in bad.stderr.lower()
