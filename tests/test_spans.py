"""token_span: any span of a stream's token inputs, from the ids alone, equals the whole stream's rows."""

from __future__ import annotations

import pytest
import torch
from newllm_kit_plugins.cvfp.spans import token_span


@pytest.mark.parametrize("num_input_tokens", [1, 2, 3])
def test_every_span_matches_the_whole_stream(num_input_tokens: int) -> None:
    cvfp = pytest.importorskip("newllm_kit_plugins.cvfp.model")
    torch.manual_seed(0)
    settings = cvfp.CVFPSettings(layers=2, context_dim=8, embedding_dim=4, num_input_tokens=num_input_tokens)
    model = cvfp.CVFPArchitecture(settings).build(30)
    ids = torch.randint(0, 30, (40,))
    with torch.no_grad():
        whole = model.token_inputs(ids)
        for start, stop in [(0, 1), (0, 7), (1, 3), (2, 9), (17, 40), (39, 40)]:
            torch.testing.assert_close(token_span(model, ids, start, stop), whole[start:stop], rtol=0, atol=0)
