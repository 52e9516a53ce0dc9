"""The `cvfp` command line itself: a command imports only what it uses, and asking about a store creates none.

`cvfp ui`'s link on a real store is checked in a browser by tests/test_mlflow_ui.py."""

import os
import subprocess
import sys

import pytest

LOADED = ("import sys\nfrom cvfp.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as stop:\n"
          "    print(stop.code, 'torch' in sys.modules, 'matplotlib' in sys.modules)")


def cli(*argv, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "cvfp.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("argv", [["servers"], ["--help"]])
def test_light_commands_import_neither_torch_nor_matplotlib(argv):
    """`cvfp servers` and `cvfp --help` answer in a fraction of a second: torch and matplotlib (~4 s) stay out."""
    done = subprocess.run([sys.executable, "-c", LOADED.format(argv=argv)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["0", "False", "False"], done.stdout


@pytest.mark.parametrize("command, option", [("generate", "--prompt"), ("study", "--experiments")])
def test_a_heavy_command_still_has_all_its_options(command, option):
    done = cli(command, "--help")
    assert done.returncode == 0 and option in done.stdout, done.stdout + done.stderr


def test_ui_link_without_a_store_is_an_error_and_creates_no_store(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["DVC_ROOT"] = str(tmp_path)
    done = cli("ui", "--url-only", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert f"no MLflow store {tmp_path / 'mlflow.db'}: run `dvc repro` first" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_ui_link_from_a_file_that_is_no_store_is_an_error(tmp_path):
    (tmp_path / "mlflow.db").write_text("not a database\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["DVC_ROOT"] = str(tmp_path)
    done = cli("ui", "--url-only", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert f"{tmp_path / 'mlflow.db'} is not a readable MLflow store" in done.stderr, done.stderr
    assert (tmp_path / "mlflow.db").read_text() == "not a database\n"
