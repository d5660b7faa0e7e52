"""Dataset paths that are URIs (issue 30 item 3): `data.path` (and a stage's) may be
`file://`, `s3://`, `gs://`, ... and nothing turns a URI into a local path; `run_dir` stays
local. What runs here is `file://` (no network): a locally written set read through
`file://` URIs, and the same set read under an `s3://` URI whose filesystem the test swaps
for the local one, so the non-`file` code path (listing, schemas, reads through
`pyarrow.fs`) runs too. Real S3/GCS is not run here."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raybench.cli import main
from raybench.config import URI, ConfigError, load_config, validate_config
from raybench.data import loader
from raybench.data.loader import DataError, dataset_columns, parquet_files, read_split, validate_dataset
from raybench.data.prepare import ensure_data
from raybench.data.synthetic import write_synthetic
from raybench.train.trainer import dataset_key, stage_data, storage_path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs/configs/smoke.yaml"
COLUMNS = ["image", "messages", "qtype", "answer", "question", "split"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small synthetic set at the smoke config's image size, plus files a reader skips."""
    out = tmp_path_factory.mktemp("uris") / "d"
    write_synthetic(out, num_train=48, num_val=16, image_size=load_config(SMOKE).image_size, seed=0)
    (out / "_SUCCESS").write_text("")
    (out / "_tmp").mkdir()
    pq.write_table(pq.read_table(out / "val.parquet"), out / "_tmp" / "partial.parquet")
    return out


@pytest.fixture
def s3_is_local(monkeypatch, dataset):
    """`s3://bucket/prefix` read from the local set: pyarrow's filesystem for the URI is
    swapped for the local one (this machine has no network), everything else is the URI path."""
    seen = []

    def filesystem(uri: str):
        seen.append(uri)
        assert uri.startswith("s3://bucket/prefix"), uri
        return pafs.LocalFileSystem(), str(dataset) + uri[len("s3://bucket/prefix"):]

    monkeypatch.setattr(loader, "_filesystem", filesystem)
    return seen


def tables_equal(a, b) -> bool:
    return a.to_pydict() == b.to_pydict()


@pytest.mark.parametrize("form", ["directory", "directory/", "file"])
def test_file_uris_read_like_the_plain_path(dataset, form):
    plain = dataset / "train.parquet" if form == "file" else dataset
    uri = plain.as_uri() + ("/" if form.endswith("/") else "")
    assert uri.startswith("file:///")
    want = {"train": 48} if form == "file" else {"train": 48, "val": 16}
    assert validate_dataset(uri, splits=("train",)) == validate_dataset(plain, splits=("train",)) == want
    assert dataset_columns(uri) == dataset_columns(plain)
    assert tables_equal(read_split(uri, "train", columns=COLUMNS), read_split(plain, "train", columns=COLUMNS))
    files = parquet_files(uri)
    # Names in messages are the URIs; `_SUCCESS` and `_tmp/` are skipped, as for a local path.
    assert files == ([uri] if form == "file" else [dataset.as_uri() + "/train.parquet",
                                                   dataset.as_uri() + "/val.parquet"])
    assert len(files) == len(parquet_files(plain))


def test_a_config_with_a_file_uri_gives_the_rows_of_the_plain_path(dataset, tmp_path):
    base = {"name": "u", "run_dir": str(tmp_path / "run")}
    by_uri = validate_config({**base, "data": {"path": dataset.as_uri()}})
    by_path = validate_config({**base, "data": {"path": str(dataset)}})
    assert by_uri.data_path == by_path.data_path == dataset  # file:// is local: a Path
    for split in ("train", "val"):
        assert tables_equal(read_split(by_uri.data_path, split), read_split(by_path.data_path, split))
    assert ensure_data(by_uri) == {"train": 48, "val": 16}
    assert not (tmp_path / "run").exists()  # validated only, nothing synthesised into run_dir


def test_an_s3_data_path_stays_a_uri(tmp_path):
    cfg = validate_config({"run_dir": str(tmp_path / "run"), "data": {"path": "s3://bucket/prefix"},
                           "train": {"stages": [{"name": "one", "steps": 1, "data": {"path": "gs://b/stage"}},
                                                {"name": "main"}]}})
    assert isinstance(cfg.data_path, URI) and cfg.data_path == "s3://bucket/prefix"
    # What callers do to a local path (make it absolute) leaves a URI as it is.
    assert str(cfg.data_path.resolve()) == str(cfg.data_path.expanduser()) == "s3://bucket/prefix"
    assert cfg.stage_path(cfg.train.stages[0]) == "gs://b/stage"
    # The Ray trainer's dataset key carries the URIs to `ray.data.read_parquet` unchanged.
    assert dataset_key(cfg)[0] == "s3://bucket/prefix"
    assert stage_data(cfg) == (("stage-one", "gs://b/stage"),)


def test_a_non_file_uri_is_read_through_its_filesystem(dataset, tmp_path, s3_is_local):
    uri = "s3://bucket/prefix"
    assert validate_dataset(uri) == validate_dataset(dataset)
    assert dataset_columns(uri) == dataset_columns(dataset)
    for split in ("train", "val"):
        assert tables_equal(read_split(uri, split, columns=COLUMNS), read_split(dataset, split, columns=COLUMNS))
    assert parquet_files(uri) == [f"{uri}/train.parquet", f"{uri}/val.parquet"]
    assert parquet_files(uri + "/val.parquet") == [f"{uri}/val.parquet"]
    cfg = validate_config({"run_dir": str(tmp_path / "run"), "data": {"path": uri}})
    assert ensure_data(cfg) == {"train": 48, "val": 16}  # only validated: no local s3:/ anywhere
    assert not (tmp_path / "run").exists() and not Path("s3:").exists()
    assert set(s3_is_local) <= {uri, uri + "/val.parquet"}
    with pytest.raises(DataError, match=r"0 rows with split == 'test'.*"):
        validate_dataset(uri, splits=("test",))
    with pytest.raises(DataError, match=r"dataset at s3://bucket/prefix has 0 rows with split == 'test'"):
        read_split(uri, "test")


def test_uri_errors_are_data_errors_that_name_the_uri(monkeypatch, tmp_path):
    missing = (tmp_path / "nowhere").as_uri()
    with pytest.raises(DataError, match=f"does not exist: {missing}$"):
        validate_dataset(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no .parquet files under {(tmp_path / 'empty').as_uri()}"):
        dataset_columns((tmp_path / "empty").as_uri())
    with pytest.raises(DataError, match=r"cannot read dataset nosuch://x/y: .*Unrecognized filesystem"):
        validate_dataset("nosuch://x/y")

    def denied(uri):  # what pyarrow's S3 filesystem raises without credentials
        raise OSError("When getting information for bucket 'bucket': AWS Error ACCESS_DENIED during "
                      "HeadBucket operation: No response body.\nsecond line of detail")

    monkeypatch.setattr(loader, "_filesystem", denied)
    with pytest.raises(DataError) as info:
        read_split("s3://bucket/prefix", "train")
    msg = str(info.value)
    assert msg.startswith("cannot read dataset s3://bucket/prefix: OSError: ") and "ACCESS_DENIED" in msg
    assert "second line" not in msg


def test_run_dir_is_local(tmp_path):
    cfg = validate_config({"run_dir": (tmp_path / "run").as_uri()})
    assert cfg.run_path == tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        validate_config({"run_dir": "s3://bucket/runs/x"})
    msg = str(info.value)
    assert "run_dir = 's3://bucket/runs/x': must be a local directory" in msg
    assert "train.storage_path: s3://" in msg
    with pytest.raises(ConfigError, match=r"data.path = 'file://data/x': .*file:///abs/path.*not host 'data'"):
        validate_config({"data": {"path": "file://data/x"}})


def test_a_storage_path_uri_reaches_ray_unchanged(tmp_path):
    for where in ("file:///shared/ckpt", "s3://bucket/ckpt"):
        assert storage_path(validate_config({"train": {"storage_path": where}})) == where
    cfg = validate_config({"run_dir": (tmp_path / "run").as_uri()})
    assert storage_path(cfg) == str(tmp_path / "run" / "ray")


@pytest.mark.parametrize("scheme", ["file", "s3"])
def test_train_local_on_a_uri(dataset, tmp_path, scheme, request):
    """`raybench train --local --set data.path=<URI>` on the smoke config: 2 steps. `s3`: the
    URI's filesystem swapped for the local one, so the trainer sees the URI throughout."""
    if scheme == "s3":
        request.getfixturevalue("s3_is_local")
    data = dataset.as_uri() if scheme == "file" else "s3://bucket/prefix"
    run = tmp_path / "run"
    overrides = [f"run_dir={run.as_uri()}", f"data.path={data}", "model.size=tiny", "train.steps=2",
                 "train.batch_size=8", "train.eval_every=2", "train.eval_samples=8", "train.warmup_steps=1"]
    assert main(["train", "--local", "--config", str(SMOKE), *[x for o in overrides for x in ("--set", o)]]) == 0
    history = [json.loads(line) for line in (run / "logs" / "train_local.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2]
    assert (run / "model").is_dir() and not (run / "data").exists()
