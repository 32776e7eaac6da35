"""The README's tour, run as written and in order (its bash and Python blocks between the tour markers),
on the nano model and the digits the quickstart leaves behind, gives correct results."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

from nfnet_hub.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def _tour() -> list[tuple[str, str]]:
    tour = README.read_text().split("<!-- tour -->")[1].split("<!-- /tour -->")[0]
    return re.findall(r"```(bash|python)\n(.*?)```", tour, re.S)


def test_the_tour_covers_the_chain():
    commands = " ".join(code for _, code in _tour())
    for step in ("nfnet-hub train", "nfnet-hub export", "--precision int8", "nfnet-hub validate", "nfnet-hub bundle",
                 "nfnet-hub publish", "nfnet-hub predict", "fold(", "prepack(", "export_onnx(", "local-dir:",
                 "OnnxClassifier"):
        assert step in commands, step


def _commands(bash: str) -> list[list[str]]:
    """A bash block's commands, each split as bash splits it (lines joined at their backslashes, comments left out)."""
    return [argv for line in bash.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))]


def test_the_readme_tour_runs_as_written(tmp_path, digits_folders, capsys, monkeypatch):
    """Each command runs in this process (a process each would import torch and timm again: a minute on 2 cores),
    through the function the installed `nfnet-hub` script calls; each Python block runs as a script."""
    assert (Path(sys.executable).parent / "nfnet-hub").is_file()  # the console script the README's commands call
    shutil.copytree(digits_folders, tmp_path / "artifacts" / "quickstart" / "digits")
    monkeypatch.chdir(tmp_path)
    outputs = []
    for kind, code in _tour():
        if kind == "bash":
            for argv in _commands(code):
                assert argv[0] == "nfnet-hub", argv  # a command of another kind would need a shell
                assert main(argv[1:]) == 0, f"{shlex.join(argv)}\n{capsys.readouterr()}"
        else:
            exec(compile(code, str(README), "exec"), {"__name__": "__main__"})
        outputs.append(capsys.readouterr().out)
    train, export, py_export, bundle, py_consume = outputs
    top1 = float(re.search(r"done: top-1 ([\d.]+)%", train).group(1))
    assert top1 >= 95.0
    assert "preprocessing: 32x32 px, squash crop 1, bicubic, mean (0.27, 0.27, 0.27)" in export
    assert "from the data config recorded in model_best.pth.tar" in export
    assert "calibration: 500 of the 1437 images in artifacts/quickstart/digits/train, evenly spaced" in export
    assert re.search(r"int8 agrees with fp32 on (9[5-9]|100)\.\d% of 100 held-out calibration images", export)
    report = json.loads(export[export.index("{"):export.rindex("}") + 1])
    assert report["inputs"] == 360 and report["torch_accuracy"] >= 95.0 and report["top1_agreement"] >= 0.98
    assert abs(report["accuracy_change"]) <= 1.0
    nodes, error = py_export.split()
    assert int(nodes) < 100 and float(error) < 1e-4
    assert "dry run: would upload 7 files" in bundle
    predict = bundle[bundle.index("artifacts/quickstart/digits/validation/3/0000.png"):].splitlines()
    assert predict[1].split()[-1] == "3"  # the top label of a held-out 3
    assert "label='7'" in py_consume
