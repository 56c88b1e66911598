"""One data root, one variable (architecture-2 G10): ``$ETBENCH_DATA`` redirects every loader — images, anomaly graphs,
TU graph classification — an unset variable falls back to ``../shared/data``, a missing root is an error naming the
variable, and the retired ``$ETBENCH_SHARED_DATA`` warns and redirects nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_file

from etbench.data import DatasetError
from etbench.data.graphs import load_graph_dataset
from etbench.data.images import load_image_dataset
from etbench.data.paths import DATA_ENV, RETIRED_ENV, data_root, resolve_data_path
from etbench.data.tudataset import load_tu_dataset

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO.parent / "shared" / "data"


def test_unset_variable_falls_back_to_the_shared_data_beside_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.delenv(RETIRED_ENV, raising=False)
    assert data_root(check=False) == SHIPPED
    assert resolve_data_path("no/such/relative/file") == SHIPPED / "no" / "such" / "relative" / "file"


def test_the_one_variable_redirects_every_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 shared_data: Path) -> None:
    """A root that holds the datasets only as links under other names: each loader finds them there and only there
    (the checksums equal the shipped files'), whether it is given a relative path or nothing."""
    root = tmp_path / "elsewhere"
    root.mkdir()
    for sub in ("mnist", "facebook_gad", "tudataset"):
        (root / sub).symlink_to(require_file(shared_data / sub), target_is_directory=True)
    monkeypatch.setenv(DATA_ENV, str(root))
    monkeypatch.chdir(tmp_path)  # "mnist" is not in the current directory: it resolves under the root
    assert data_root() == root
    images = load_image_dataset("mnist", "mnist", limit_train=2, limit_eval=2)
    assert images.image_shape == (1, 28, 28)
    graph = load_graph_dataset("facebook")  # no path: the dataset's default place under the root
    assert graph.checksum == load_graph_dataset("facebook", shared_data / "facebook_gad" / "Facebook.mat").checksum
    assert load_graph_dataset("facebook", "facebook_gad/Facebook.mat").checksum == graph.checksum
    tu = load_tu_dataset("mutag")
    assert tu.info.checksum == load_tu_dataset("mutag", shared_data / "tudataset" / "MUTAG.zip").info.checksum
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no file at"):  # the same call now looks in the new root
        load_graph_dataset("facebook")


def test_a_missing_root_is_an_error_naming_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "typo"
    monkeypatch.setenv(DATA_ENV, str(missing))
    monkeypatch.chdir(tmp_path)
    calls = [lambda: load_graph_dataset("facebook"), lambda: load_tu_dataset("mutag"),
             lambda: load_image_dataset("mnist", "mnist"), lambda: resolve_data_path("mnist"), data_root]
    for call in calls:
        with pytest.raises(DatasetError) as err:
            call()
        msg = str(err.value)
        assert f"${DATA_ENV}={missing}" in msg and "is not a directory" in msg and f"set {DATA_ENV}" in msg, msg
    assert data_root(check=False) == missing  # the unchecked form (messages, conftest) never raises


def test_the_retired_variable_warns_and_redirects_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    monkeypatch.setenv(RETIRED_ENV, str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match=rf"\${RETIRED_ENV} is no longer read.*\${DATA_ENV}"):
        assert data_root() == tmp_path
