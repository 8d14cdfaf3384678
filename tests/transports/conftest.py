import gc, pytest
@pytest.fixture(autouse=True)
def _gc_each():
    yield
    gc.collect()
