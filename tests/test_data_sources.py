"""data=file's versions, resolved before data_prep (components/data_sources.py): a local file's
sha256, an S3 object's ETag or VersionId on a real moto_server (conftest.py); what is read is the
version resolved, and the bad inputs are one line each."""

import hashlib

import pytest

from components import data_prep, data_sources, datasets
from components.errors import DataError
from conftest import config, free_port

CSV = "a,b,label\n" + "".join(f"{i % 7},{i % 5},{i % 2}\n" for i in range(60))
CSV2 = CSV + "".join(f"{i % 3},{i % 4},{i % 2}\n" for i in range(30))


def test_a_local_file_is_versioned_by_its_sha256_and_checked_when_read(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(CSV)
    raw = config(data={"name": "file", "path": str(path), "target": "label"}).to_dict()
    resolved = data_sources.resolve(raw)
    sha = hashlib.sha256(CSV.encode()).hexdigest()
    assert resolved == {"kind": "file", "path": str(path), "version": sha}
    assert data_prep.run(raw, str(tmp_path / "d1"), resolved)["data_version"] == sha
    path.write_text(CSV2)  # changed between resolve_data and data_prep: not read as the old version
    with pytest.raises(DataError) as err:
        data_prep.run(raw, str(tmp_path / "d2"), resolved)
    assert str(err.value) == (f"data.path: {path} changed since its version was resolved (sha256 {sha} -> "
                              f"{hashlib.sha256(CSV2.encode()).hexdigest()}); run again to read the new one")
    assert not (tmp_path / "d2").exists()


def s3_config(server, uri, **storage):
    return {"data": {"name": "file", "path": uri, "target": "label"},
            "storage": {"endpoint_url": server.endpoint_url, "region": "us-east-1", **storage}}


def build(raw, resolved, out):
    """data_prep on the resolved version; the dataset artifact it wrote."""
    data_prep.run(config(data=raw["data"], storage=raw["storage"]).to_dict(), str(out), resolved)
    return datasets.load(out)


def test_an_s3_object_is_versioned_by_its_etag_and_read_only_while_it_is_that(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="tables/t.csv", Body=CSV.encode())
    raw = s3_config(s3_server, f"s3://{s3_bucket}/tables/t.csv")
    resolved = data_sources.resolve(raw)
    etag = hashlib.md5(CSV.encode()).hexdigest()  # a single-part upload's ETag
    assert resolved == {"kind": "s3", "uri": f"s3://{s3_bucket}/tables/t.csv", "version": etag, "version_id": None,
                        "etag": etag}
    dataset = build(raw, resolved, tmp_path / "d1")
    assert dataset.data_version == etag and sum(dataset.manifest["counts"].values()) == 60
    assert dataset.manifest["origin"] == f"s3://{s3_bucket}/tables/t.csv"
    client.put_object(Bucket=s3_bucket, Key="tables/t.csv", Body=CSV2.encode())
    with pytest.raises(DataError) as err:
        build(raw, resolved, tmp_path / "d2")
    assert str(err.value) == (f"data.path: s3://{s3_bucket}/tables/t.csv changed since its version was resolved "
                              f"(ETag {etag}); run again to read the new one")
    assert data_sources.resolve(raw)["version"] == hashlib.md5(CSV2.encode()).hexdigest()


def test_a_versioned_bucket_serves_the_resolved_version_after_an_overwrite(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    first = client.put_object(Bucket=s3_bucket, Key="t.csv", Body=CSV.encode())["VersionId"]
    raw = s3_config(s3_server, f"s3://{s3_bucket}/t.csv")
    resolved = data_sources.resolve(raw)
    assert resolved["version"] == resolved["version_id"] == first
    second = client.put_object(Bucket=s3_bucket, Key="t.csv", Body=CSV2.encode())["VersionId"]
    assert sum(build(raw, resolved, tmp_path / "d").manifest["counts"].values()) == 60  # still the first
    assert data_sources.resolve(raw)["version"] == second != first


def test_bad_s3_inputs_are_one_line_each(s3_server, s3_bucket):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cases = [
        (s3_config(s3_server, f"s3://{s3_bucket}/missing.csv"),
         f"data.path: no object 'missing.csv' in bucket '{s3_bucket}' (s3://{s3_bucket}/missing.csv)"),
        (s3_config(s3_server, "s3://no-such-bucket-here/t.csv"),
         f"data.path: bucket 'no-such-bucket-here' does not exist at {s3_server.endpoint_url}; check the URI "
         "(or storage.endpoint_url)"),
        (s3_config(s3_server, f"s3://{s3_bucket}/"),
         f"data.path: s3://{s3_bucket}/ does not name an object; use s3://bucket/path/to/file.csv"),
        ({**s3_config(s3_server, f"s3://{s3_bucket}/t.csv"), "storage": {"endpoint_url": dead, "max_attempts": 1}},
         f"data.path: s3://{s3_bucket}/t.csv: cannot reach the S3 endpoint {dead} (1 attempt); check "
         "storage.endpoint_url and that the server is up"),  # components/s3.py's line, as for output_dir
    ]
    for raw, message in cases:
        with pytest.raises(DataError) as err:
            data_sources.resolve(raw)
        assert str(err.value) == message
