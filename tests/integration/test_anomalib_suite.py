"""anomalib's own model integration test, in its shape, run on CGAD, ResAD and MetaAD.

anomalib checks every built-in model with ``tests/integration/model/test_models.py``: on its dummy MVTec AD data
(:mod:`anomalib_dummy`), one shared project root, ``Engine(logger=False, default_root_dir=project_path,
max_epochs=1, devices=1)`` and ``MVTecAD(root=..., category="dummy", train_batch_size=2)``, it runs ``fit``, then
``test``, ``train``, ``validate``, ``predict`` and ``export`` (every ``ExportType``) from
``<project>/<Model>/MVTecAD/dummy/v0/weights/lightning/model.ckpt``. The class below is that test, written by us,
over our three models (built with ``get_model(name)``, as anomalib builds its own), followed by what anomalib's
test does not check but a user relies on: every export loads in anomalib's ``TorchInferencer`` /
``OpenVINOInferencer`` and scores like the torch model, and a re-export into the same root replaces the previous
one whole.

Where our models differ on purpose: they score a class against k normal *reference* images of that class. With a
plain anomalib datamodule those are the first ``k_shot`` normal training images of the category (here the dummy
category's own ``train/good``), so every call above runs unchanged; :meth:`TestAPI.test_references` shows the
user-visible equivalent (the bank holds ``k_shot`` references, and ``few_shot_source=<folder>`` swaps them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.deploy import ExportType, OpenVINOInferencer, TorchInferencer
from anomalib.engine import Engine
from anomalib.models import get_model
from anomalib_dummy import make_dummy_mvtecad

from anomalib_cgad.components.flow import FlowOptions
from anomalib_cgad.deploy import F32_CONFIG, BankError, BankInferencer

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

MODELS = ["cgad", "resad", "metaad"]
# As anomalib's suite passes model-specific arguments (dfkde: n_pca_components=2), ours shrink the flows from
# 8 to 2 coupling blocks: the steps and export paths are the same, the exports take half the time.
EXTRA_ARGS = {
    "cgad": {"flow": FlowOptions(coupling_blocks=2)},
    "resad": {"flow": FlowOptions(coupling_blocks=2)},
}
TOLERANCE = 1e-3


@pytest.fixture(scope="session")
def project_path(tmp_path_factory) -> Path:
    """One project root shared by every model and every step, as in anomalib's suite."""
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="session")
def dataset_path(project_path: Path) -> Path:
    """anomalib's dummy MVTec AD (5 train, 5 good + 5 bad test images, 64 px), under the project root."""
    make_dummy_mvtecad(project_path / "datasets")
    return project_path / "datasets"


def _get_objects(model_name: str, dataset_path: Path, project_path: Path, **model_args):
    dataset = MVTecAD(root=dataset_path / "mvtecad", category="dummy", train_batch_size=2, num_workers=0)
    model = get_model(model_name, **EXTRA_ARGS.get(model_name, {}), **model_args)
    engine = Engine(logger=False, default_root_dir=project_path, max_epochs=1, devices=1, accelerator="cpu")
    return model, dataset, engine


def _ckpt(project_path: Path, model, dataset) -> str:
    return f"{project_path}/{model.name}/{dataset.name}/dummy/v0/weights/lightning/model.ckpt"


class TestAPI:
    """fit, test, train, validate, predict and export from the checkpoint, in anomalib's order."""

    @pytest.mark.parametrize("model_name", MODELS)
    def test_fit(self, model_name: str, dataset_path: Path, project_path: Path) -> None:
        model, dataset, engine = _get_objects(model_name, dataset_path, project_path)
        engine.fit(model=model, datamodule=dataset)
        assert Path(_ckpt(project_path, model, dataset)).is_file()

    @pytest.mark.parametrize("model_name", MODELS)
    def test_test(self, model_name: str, dataset_path: Path, project_path: Path) -> None:
        model, dataset, engine = _get_objects(model_name, dataset_path, project_path)
        results = engine.test(model=model, datamodule=dataset, ckpt_path=_ckpt(project_path, model, dataset))
        assert 0.0 <= results[0]["image_AUROC"] <= 1.0

    @pytest.mark.parametrize("model_name", MODELS)
    def test_train(self, model_name: str, dataset_path: Path, project_path: Path) -> None:
        model, dataset, engine = _get_objects(model_name, dataset_path, project_path)
        engine.train(model=model, datamodule=dataset, ckpt_path=_ckpt(project_path, model, dataset))

    @pytest.mark.parametrize("model_name", MODELS)
    def test_validate(self, model_name: str, dataset_path: Path, project_path: Path) -> None:
        model, dataset, engine = _get_objects(model_name, dataset_path, project_path)
        engine.validate(model=model, datamodule=dataset, ckpt_path=_ckpt(project_path, model, dataset))

    @pytest.mark.parametrize("model_name", MODELS)
    def test_predict(self, model_name: str, dataset_path: Path, project_path: Path) -> None:
        model, dataset, engine = _get_objects(model_name, dataset_path, project_path)
        predictions = engine.predict(model=model, datamodule=dataset, ckpt_path=_ckpt(project_path, model, dataset))
        assert sum(len(batch.pred_score) for batch in predictions) == 10

    @pytest.mark.parametrize("model_name", MODELS)
    @pytest.mark.parametrize("export_type", list(ExportType))
    def test_export(
        self, model_name: str, export_type: ExportType, dataset_path: Path, project_path: Path, monkeypatch, caplog
    ) -> None:
        """anomalib's export step, then what a user does next: load it in anomalib's inferencer and predict.

        All models export into the same ``<project>/weights/<type>`` (as in anomalib's suite), so every export
        after the first replaces the previous model's: whole, and saying so.
        """
        model, dataset, engine = _get_objects(model_name, dataset_path, project_path)
        folder = project_path / "weights" / export_type.value
        previous = folder.is_dir()
        with caplog.at_level(logging.INFO, logger="anomalib_cgad.deploy.replace"):
            path = engine.export(model=model, ckpt_path=_ckpt(project_path, model, dataset), export_type=export_type)
        assert Path(path).is_file()
        assert previous == any("Replaced the previous" in r.getMessage() for r in caplog.records)
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left

        monkeypatch.chdir(project_path)  # OpenVINOInferencer writes ./openvino_cache
        monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # TorchInferencer unpickles the module, as for built-ins
        inferencer = (
            TorchInferencer(path, device="cpu")
            if export_type == ExportType.TORCH
            else OpenVINOInferencer(path, device="CPU", config=F32_CONFIG)
        )
        paths = _images(dataset_path)
        with torch.no_grad():  # TorchInferencer leaves grad on, for built-in models too
            scores = np.array([float(inferencer.predict(p).pred_score.reshape(-1)[0]) for p in paths])
        expected = _torch_scores(model_name, project_path, paths)
        difference = float(np.abs(scores - expected).max())
        print(f"\n{model_name} {export_type.value} {type(inferencer).__name__} vs torch: max |diff| {difference:.1e}")
        assert difference <= TOLERANCE, (scores, expected)
        if export_type == ExportType.OPENVINO:  # the swappable-bank graphs beside it, with the same bank
            bank_scores = BankInferencer(folder).predict([str(p) for p in paths])["pred_score"]
            assert float(np.abs(bank_scores - expected).max()) <= TOLERANCE

    @pytest.mark.parametrize("model_name", MODELS)
    def test_references(self, model_name: str, dataset_path: Path, project_path: Path) -> None:
        """Our deliberate difference, as a user sees it: k references per class, from the category or a folder."""
        model, dataset, engine = _get_objects(model_name, dataset_path, project_path)
        engine.test(model=model, datamodule=dataset, ckpt_path=_ckpt(project_path, model, dataset))
        assert int(model.model.bank.num_refs) == model.k_shot  # the first k_shot images of dummy/train/good
        default_bank = [t.clone() for t in model.model.bank_tensors()]

        folder = dataset_path / "mvtecad" / "dummy" / "test" / "good"  # other normal images of the class
        model, dataset, engine = _get_objects(model_name, dataset_path, project_path, few_shot_source=str(folder))
        engine.predict(model=model, datamodule=dataset, ckpt_path=_ckpt(project_path, model, dataset))
        assert int(model.model.bank.num_refs) == model.k_shot
        assert not torch.equal(model.model.bank_tensors()[0], default_bank[0])


def _images(dataset_path: Path) -> list[Path]:
    category = dataset_path / "mvtecad" / "dummy" / "test"
    return sorted((category / "good").glob("*.png")) + sorted((category / "bad").glob("*.png"))


def _torch_scores(model_name: str, project_path: Path, paths: list[Path]) -> np.ndarray:
    """The checkpoint's own forward (pre-processor → model → post-processor), image by image."""
    model_cls = type(get_model(model_name))
    model = model_cls.load_from_checkpoint(_ckpt(project_path, get_model(model_name), MVTecAD(category="dummy")))
    model.eval()
    with torch.no_grad():
        return np.array([float(model(read_image(p, as_tensor=True)[None]).pred_score) for p in paths])


def test_a_builtin_exported_into_our_root_leaves_no_valid_looking_bank(
    dataset_path: Path, project_path: Path, tmp_path
) -> None:
    """anomalib's own export overwrites model.xml only: our bank graphs beside it are then refused."""
    from anomalib.models import Padim

    BankInferencer(project_path)  # the last of our models' exports, consistent
    padim = Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=16, visualizer=False)
    _, dataset, engine = _get_objects("cgad", dataset_path, tmp_path)
    engine.fit(model=padim, datamodule=dataset)
    engine.export(model=padim, export_type=ExportType.OPENVINO, export_root=project_path)
    with pytest.raises(BankError, match=r"mixes two exports: model\.xml was replaced"):
        BankInferencer(project_path)
