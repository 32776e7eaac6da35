"""Class names: ImageNet weights name their classes as timm's inference.py names them, through bundle, timm and the
runtime; ``--labels`` takes a file or an ImageNet subset; weights without names are said to have none."""
from __future__ import annotations

import codecs
import json

import pytest
import timm
from conftest import randomise
from timm.data import CustomDatasetInfo, DatasetInfoLabelMapper, ImageNetInfo

from nfnet_hub.classes import IMAGENET_SUBSETS, imagenet_classes, read_labels, set_class_names
from nfnet_hub.cli import main
from nfnet_hub.hub import build_bundle
from nfnet_hub.models.checkpoint import load_model, save_safetensors
from nfnet_hub.preprocess import readable_labels
from nfnet_hub.release import read_manifest
from nfnet_hub.runtime import OnnxClassifier
from nfnet_hub.serve.triton import write_repository


def test_a_pretrained_tags_imagenet_weights_get_imagenets_names(tmp_path):
    save_safetensors(randomise(timm.create_model("dm_nfnet_f0"), seed=2), tmp_path / "model.safetensors")
    model, source = load_model("nfnet_hub_f0.dm_in1k", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    info = ImageNetInfo("imagenet-1k")
    assert model.pretrained_cfg["label_names"] == info.label_names()
    assert model.pretrained_cfg["label_descriptions"] == info.label_descriptions(as_dict=True)
    assert source.classes.startswith("imagenet-1k's 1000")
    fine_tuned, source = load_model("nfnet_hub_f0.dm_in1k", pretrained=True, num_classes=10,  # a new classifier
                                    pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    assert "label_names" not in fine_tuned.pretrained_cfg and source.classes is None


def test_imagenet_names_reach_timm_and_the_runtime_as_timms_inference_names_them(tmp_path):
    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=1000))
    set_class_names(model, "ImageNet_1k")  # timm's spellings of a subset are all taken
    bundle = build_bundle(model, tmp_path / "bundle", progress=False)
    config = json.loads((bundle / "config.json").read_text())
    assert config["label_names"][:2] == ["n01440764", "n01443537"]  # WordNet ids, described, as in timm's configs
    loaded = timm.create_model(f"local-dir:{bundle}", pretrained=True)
    mapper = DatasetInfoLabelMapper(CustomDatasetInfo(loaded.pretrained_cfg["label_names"],
                                                      loaded.pretrained_cfg["label_descriptions"]))
    expected = [mapper(i) for i in range(1000)]  # what timm's inference.py prints for this model
    assert expected[1] == "goldfish, Carassius auratus"
    assert OnnxClassifier.from_pretrained(bundle).labels == expected
    assert OnnxClassifier.from_pretrained(bundle / "model.onnx").labels == expected  # the file's own metadata
    triton = write_repository(bundle, tmp_path / "triton")  # Triton's classification extension prints these
    assert (triton / "labels.txt").read_text().splitlines() == expected


def test_labels_in_timms_index_form_are_read_by_index():
    assert readable_labels({"label_names": {"1": "dog", "0": "cat"}}) == ["cat", "dog"]
    assert readable_labels({"label_names": {"0": "cat", "2": "dog"}}) is None  # sparse: not a name per output
    assert readable_labels({"label_names": ["a", "b"], "label_descriptions": {"a": "an a"}}) == ["an a", "b"]


def test_labels_option_names_classes_or_says_why_not(tmp_path, capsys):
    nano = randomise(timm.create_model("nfnet_hub_nano", num_classes=3))
    save_safetensors(nano, tmp_path / "nano.safetensors")
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    args = ["export", "nfnet_hub_nano", "--checkpoint", str(tmp_path / "nano.safetensors")]
    assert main([*args, "--out", str(tmp_path / "named"), "--labels", str(tmp_path / "labels.txt")]) == 0
    assert OnnxClassifier(tmp_path / "named" / "model.onnx").labels == ["cat", "dog", "bird"]
    assert main([*args, "--out", str(tmp_path / "unnamed")]) == 0
    assert "note: the weights name none of their 3 classes, so predictions name them by index" in \
        capsys.readouterr().out
    assert OnnxClassifier(tmp_path / "unnamed" / "model.onnx").labels == ["0", "1", "2"]
    (tmp_path / "twice.txt").write_text("cat\ndog\ncat\n")  # a copy-paste slip: two outputs, one name
    for labels, words in (("imagenet-1k", "--labels imagenet-1k names 1000 classes, but the model has 3"),
                          (str(tmp_path / "twice.txt"), "names 'cat' more than once"),
                          ("imagenet-2k", "no such file, nor an ImageNet subset whose names timm gives")):
        assert main([*args, "--out", str(tmp_path / "x"), "--labels", labels]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "release.toml").write_text('[[model]]\nrepo_id = "me/x"\nmodel = "nfnet_hub_nano"\n'
                                           'weights = "nano.safetensors"\nlabels = "imagenet-1k"\n')
    assert read_manifest(tmp_path / "release.toml")[0]["labels"] == "imagenet-1k"  # a subset, not a missing file


@pytest.mark.parametrize("encoding, newline", [("utf-8-sig", "\r\n"), ("utf-16", "\r\n"), ("utf-16-be", "\n"),
                                               ("utf-8", "\r")])
def test_labels_are_read_as_windows_and_mac_editors_write_them(tmp_path, encoding, newline):
    """Excel's and Notepad's byte-order mark would stick to the first name, PowerShell writes UTF-16."""
    names = ["café", "chien", "鳥"]
    data = newline.join(names).encode(encoding)
    (tmp_path / "labels.txt").write_bytes(data if encoding != "utf-16-be" else codecs.BOM_UTF16_BE + data)
    assert read_labels(tmp_path / "labels.txt") == names


def test_every_subset_named_is_one_timm_knows():
    for subset in IMAGENET_SUBSETS:
        classes = imagenet_classes(subset)
        assert len(classes["label_names"]) == len(classes["label_descriptions"]) >= 1000, subset


def test_validate_scores_images_in_imagenets_folders_named_by_wordnet_id(tmp_path, digits_folders):
    """ImageNet's validation set comes in folders named by WordNet id (n01440764/...), the names timm's configs use;
    the export's labels describe them ("tench, Tinca tinca"), and either names a folder."""
    import shutil

    from nfnet_hub.export import export_onnx, validate_onnx
    from nfnet_hub.preprocess import list_images

    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=1000))
    set_class_names(model, "imagenet-1k")
    export_onnx(model, tmp_path / "model.onnx")
    clf = OnnxClassifier(tmp_path / "model.onnx")
    digits = [list_images(digits_folders / "validation" / d)[0] for d in "012345"]
    predicted = clf.logits(clf.preprocess.batch(digits)).argmax(-1)
    images = []
    for i, (path, index) in enumerate(zip(digits, predicted)):  # four in the folder of their class, two not
        folder = tmp_path / "val" / model.pretrained_cfg["label_names"][index if i < 4 else (index + 1) % 1000]
        folder.mkdir(parents=True, exist_ok=True)
        images.append(folder / f"{i}.png")
        shutil.copy(path, images[-1])
    report = validate_onnx(tmp_path / "model.onnx", model, images)
    assert report.accuracy_note is None and report.onnx_accuracy == pytest.approx(100 * 4 / 6)


def test_classes_named_by_wordnet_id_are_described_as_timm_describes_them(tmp_path, capsys):
    """A run on ImageNet's folders (named n01440764/ ...) records those ids; predictions say what they are."""
    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=2))
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ["n01440764", "n01443537"]}
    save_safetensors(model, tmp_path / "imagenet-run.safetensors")
    assert main(["export", "nfnet_hub_nano", "--checkpoint", str(tmp_path / "imagenet-run.safetensors"),
                 "--out", str(tmp_path / "out")]) == 0
    assert "classes: the weights name 2 by WordNet id (n01440764 ...), described as timm describes them" in \
        capsys.readouterr().out
    info = ImageNetInfo()
    assert OnnxClassifier(tmp_path / "out" / "model.onnx").labels == [info.index_to_description(i) for i in (0, 1)]
    (tmp_path / "ids.txt").write_text("n01443537\nnot-an-id\n")  # not all ids: names as given
    assert main(["export", "nfnet_hub_nano", "--checkpoint", str(tmp_path / "imagenet-run.safetensors"),
                 "--labels", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "mixed")]) == 0
    assert OnnxClassifier(tmp_path / "mixed" / "model.onnx").labels == ["n01443537", "not-an-id"]
