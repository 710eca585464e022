import pytest
from codec_cases import Codec, get_codec
from codec_models import BUILDERS


@pytest.fixture(params=list(BUILDERS), scope="session")
def codec(request) -> Codec:
    return get_codec(request.param)
