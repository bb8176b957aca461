"""The Ray paths of the CLI without a cluster: the missing extra, Ray-free plain serving, deployment options."""
import subprocess
import sys

import pytest

from engine.scaleout.serve import deployment_options

NO_RAY = "import sys; sys.modules['ray'] = None; from engine.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("argv", [["serve", "--replicas", "2"], ["batch", "rank", "--input", "x.jsonl",
                                                                   "--output", "o.parquet"]])
def test_without_ray_one_line_naming_the_extra(argv):
    proc = subprocess.run([sys.executable, "-c", NO_RAY, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "rerank-engine[ray]"' in lines[0], proc.stderr


@pytest.mark.parametrize("module", ["pyarrow", "ray"])
def test_run_batch_without_the_extra_names_it(module):
    """From Python too: the extra is named, not a raw ModuleNotFoundError of pyarrow."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from engine import run_batch\n"
            "try:\n"
            "    run_batch('rank', 'x.jsonl', 'o.parquet')\n"
            "except ImportError as e:\n"
            "    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("RayMissing") and 'pip install "rerank-engine[ray]"' in proc.stdout, proc.stdout
    assert f"no module {module}" in proc.stdout


def test_plain_serve_path_is_ray_free():
    code = ("import sys, engine.cli, engine.serving.server, engine.serving.service, engine.api; "
            "engine.cli._parser().parse_args(['serve']); assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ray_options_need_replicas(capsys):
    from engine.cli import main

    assert main(["serve", "--ray-address", "127.0.0.1:1"]) == 2
    assert "go with --replicas N" in capsys.readouterr().err


def test_deployment_options():
    fixed = deployment_options(3, max_queue=64, cpus=2)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2}
    assert fixed["max_ongoing_requests"] == 128  # past the engine's limit: its 429 answers the excess
    auto = deployment_options(2, max_queue=64, max_replicas=8, gpus=True)
    assert auto["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1}
    assert auto["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 8,
                                          "target_ongoing_requests": 16.0}
    assert "num_replicas" not in auto
    with pytest.raises(ValueError, match="less than replicas"):
        deployment_options(4, max_queue=8, max_replicas=2)
