import random

import pytest

WORDS = ("the movie was great good bad awful fine plot actor story answer yes no question what why "
         "because I you we it is are love hate film scene end begin human assistant hello thanks").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + rng.choice([".", "?", "!"])
            for _ in range(n)] + ["Answer: yes", "Question: what? Answer: no", "Human: hi\n\nAssistant: hello"]


@pytest.fixture(scope="session")
def tokenizer():
    from prefalign.models.tiny import build_tokenizer

    return build_tokenizer(corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def bos_tokenizer():
    from prefalign.models.tiny import build_tokenizer

    return build_tokenizer(corpus(), vocab_size=400, bos=True)
