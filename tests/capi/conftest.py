import os

import kvxfer_capi_testlib as capi
import pytest


@pytest.fixture(scope="session")
def lib():
    path = capi.library_path()
    if not path.exists():
        if "KVXFER_CAPI_LIB" in os.environ:
            pytest.fail(f"KVXFER_CAPI_LIB={path} does not exist")
        pytest.skip(
            f"{path} is not built: cmake --build build/cpp (KVXFER_BUILD_CAPI=ON) or set KVXFER_CAPI_LIB"
        )
    return capi.load()
