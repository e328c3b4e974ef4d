import os
import tempfile

import pytest

# every test run gets its own cache: no state leaks in from (or out to) the user's ~/.cache
os.environ.setdefault("DALI_SCP_CACHE", tempfile.mkdtemp(prefix="dali_scp_test_cache_"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU with CuPy (run by scripts/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: minutes of CPU; run with -m slow")


def pytest_collection_modifyitems(config, items):
    from dali_scp.deps import gpu_available
    if gpu_available():
        return
    if os.environ.get("DALI_SCP_REQUIRE_GPU") == "1":
        return  # scripts/gpu_check.sh: a GPU test that cannot run fails (pytest_runtest_setup), never skips
    skip = pytest.mark.skip(reason="no CUDA GPU here; scripts/gpu_check.sh runs these on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def syn_root(tmp_path_factory):
    from dali_scp.synthetic import generate
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, train=24, val=8, seed=3)
    return root


@pytest.fixture(scope="session")
def syn_train(syn_root):
    from dali_scp.dataset import resolve
    return resolve(syn_root, "train2017")


@pytest.fixture(scope="session")
def syn_ann(syn_train):
    import json
    doc = json.loads(syn_train.annotations.read_text())
    by_img = {}
    for a in doc["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    return {im["id"]: (im, by_img.get(im["id"], [])) for im in doc["images"]}


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and os.environ.get("DALI_SCP_REQUIRE_GPU") == "1":
        from dali_scp.deps import gpu_problem
        problem = gpu_problem()
        if problem:
            pytest.fail(f"DALI_SCP_REQUIRE_GPU=1 but the GPU path cannot run here: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def small_root(tmp_path_factory):
    """Synthetic datasets of n training (and validation) images, smaller than a batch or with partial
    batches; made once per size."""
    from dali_scp.synthetic import generate
    made = {}

    def make(n: int):
        if n not in made:
            made[n] = generate(tmp_path_factory.mktemp(f"small{n}"), train=n, val=n, seed=10 + n)
        return made[n]
    return make
