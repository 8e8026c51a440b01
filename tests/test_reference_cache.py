"""The testbed reference features are computed once per machine and read back from the cache folder."""
import glob
import os

import numpy as np

from ditgraft.data.mnist5k import load_mnist5k
from ditgraft.eval import evaluate
from ditgraft.eval.classifier import testbed_features


def test_reference_features_are_cached_and_equal_to_a_fresh_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("DITGRAFT_CACHE", str(tmp_path))
    evaluate._testbed_reference.cache_clear()
    try:
        first = evaluate._testbed_reference("val")
        files = glob.glob(os.path.join(tmp_path, "testbed_reference_val_*.npz"))
        assert len(files) == 1
        evaluate._testbed_reference.cache_clear()
        again = evaluate._testbed_reference("val")  # read back from the file
        x, y = load_mnist5k("val")
        fresh = testbed_features(x)
        for k in ("features", "probs", "pred"):
            np.testing.assert_array_equal(again[k], first[k])
            np.testing.assert_allclose(again[k], fresh[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(again["labels"], y.numpy())
        # a torn cache file is computed again, not trusted
        with open(files[0], "wb") as f:
            f.write(b"torn")
        evaluate._testbed_reference.cache_clear()
        np.testing.assert_array_equal(evaluate._testbed_reference("val")["features"], first["features"])
    finally:
        evaluate._testbed_reference.cache_clear()
