"""The one fetcher of prior features: each source (ArrayRecord file, official `.npy`, none, a landmark
model for one image) and the errors it gives, in the error class its caller asks for."""

import cv2
import numpy as np
import pytest

from emola_jax.apps.demo_models import toy_landmark_graph
from emola_jax.data import landmark_store, landmarks
from emola_jax.data.conversation import BadRecord
from emola_jax.data.priors import PriorFeatures, image_feature, read_npy


@pytest.fixture
def sources(tmp_path):
    """Two records' features in an ArrayRecord file, a third record's in an official `[1, 212]` `.npy`."""
    rng = np.random.default_rng(0)
    features = {f"r{i}": rng.standard_normal(212).astype(np.float32) for i in range(3)}
    table = tmp_path / "features.array_record"
    landmark_store.write_file(table, [(rid, features[rid]) for rid in ("r0", "r1")])
    (tmp_path / "landmarks").mkdir()
    np.save(tmp_path / "landmarks" / "r2.npy", features["r2"][None])
    np.save(tmp_path / "landmarks" / "short.npy", np.zeros(100, np.float32))
    (tmp_path / "landmarks" / "broken.npy").write_bytes(b"not a numpy file")
    return tmp_path, table, features


def test_a_table_answers_for_every_record(sources):
    root, table, features = sources
    prior = PriorFeatures.open(table)
    np.testing.assert_array_equal(prior.get("r0"), features["r0"])
    # the table wins over a record's own file
    np.testing.assert_array_equal(prior.get("r1", "landmarks/r2.npy", root), features["r1"])
    with pytest.raises(ValueError, match=f"record r2 has no landmark feature in {table}"):
        prior.get("r2", "landmarks/r2.npy", root)
    with pytest.raises(ValueError, match="has no landmark feature"):
        prior.get("r2", optional=True)  # optional is about a record naming nothing, not about a table's gaps


def test_without_a_table_the_records_own_npy(sources):
    root, _, features = sources
    for prior in (PriorFeatures(), PriorFeatures.open(None)):
        np.testing.assert_array_equal(prior.get("r2", "landmarks/r2.npy", root), features["r2"])
        np.testing.assert_array_equal(prior.get("r2", root / "landmarks" / "r2.npy"), features["r2"])
    prior = PriorFeatures()
    with pytest.raises(ValueError, match=r"record r3: landmark file .*short\.npy holds 100 values, not 212"):
        prior.get("r3", "landmarks/short.npy", root)
    with pytest.raises(ValueError, match=r"record r4: landmark file .*broken\.npy could not be read"):
        prior.get("r4", "landmarks/broken.npy", root)
    with pytest.raises(ValueError, match=r"record r5: landmark file .*absent\.npy could not be read"):
        prior.get("r5", "landmarks/absent.npy", root)


def test_a_record_without_a_feature(sources):
    root, _, _ = sources
    prior = PriorFeatures()
    assert prior.get("r9", optional=True) is None
    assert prior.get("r9", 12, root, optional=True) is None  # not a path: names no file
    with pytest.raises(ValueError, match=r"record r9 has no landmark path \(and no landmark ArrayRecord file"):
        prior.get("r9", None, root)


def test_errors_come_in_the_callers_class(sources):
    root, table, _ = sources
    with pytest.raises(BadRecord, match="record r2 has no landmark feature"):
        PriorFeatures.open(table, BadRecord).get("r2")
    for landmark in ("landmarks/short.npy", None):
        with pytest.raises(BadRecord, match="record r3"):
            PriorFeatures(error=BadRecord).get("r3", landmark, root)


def test_one_image_from_its_npy_a_model_or_nothing(sources):
    root, _, features = sources
    image = root / "face.png"
    cv2.imwrite(str(image), np.random.default_rng(1).integers(0, 255, (120, 90, 3), dtype=np.uint8))
    assert image_feature(image) is None
    np.testing.assert_array_equal(image_feature(image, npy=root / "landmarks" / "r2.npy"), features["r2"])
    np.testing.assert_array_equal(image_feature(image, npy=root / "landmarks" / "r2.npy"),
                                  read_npy(root / "landmarks" / "r2.npy"))
    with pytest.raises(ValueError, match=r"^landmark file .*short\.npy holds 100 values, not 212$"):
        image_feature(image, npy=root / "landmarks" / "short.npy")
    graph = toy_landmark_graph(root / "g.onnx", batch="N")
    expected = landmarks.run_session(landmarks.open_session(graph), landmarks.official_input(image)[None])[0]
    np.testing.assert_array_equal(image_feature(image, onnx=graph), expected)
    with pytest.raises(ValueError, match="not both"):
        image_feature(image, npy=root / "landmarks" / "r2.npy", onnx=graph)
