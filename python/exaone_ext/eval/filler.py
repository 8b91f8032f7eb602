"""Filler text for needle-in-a-haystack: endless, varied, plain English and Korean sentences from
small word lists and sentence patterns (nothing stored but the lists; same seed, same text).

    gen = filler_sentences("ko", seed=0)
    next(gen)   # e.g. '오래된 마을의 학생들은 저녁마다 조용한 강가를 걸었다.'
"""
from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["filler_sentences", "LANGUAGES"]

LANGUAGES = ("en", "ko")

_EN = {
    "adj": ["quiet", "old", "busy", "small", "bright", "narrow", "green", "distant", "warm", "gentle", "wide",
            "famous", "simple", "careful", "patient", "curious", "heavy", "early", "late", "northern"],
    "noun": ["farmer", "teacher", "river", "village", "market", "library", "baker", "traveller", "garden",
             "harbour", "student", "painter", "mountain", "bridge", "kitchen", "orchard", "station", "forest",
             "musician", "fisherman"],
    "plural": ["farmers", "children", "merchants", "students", "neighbours", "sailors", "gardeners", "writers",
               "visitors", "workers"],
    "verb": ["walked along", "looked at", "talked about", "cleaned", "painted", "visited", "repaired",
             "described", "passed", "remembered"],
    "place": ["the river", "the old road", "the market square", "the hills", "the harbour", "the school",
              "the small bridge", "the village hall", "the train station", "the pine forest"],
    "time": ["every morning", "in the spring", "after the rain", "before dinner", "on quiet evenings",
             "during the harvest", "in early autumn", "at noon", "late at night", "each summer"],
    "thing": ["bread", "apples", "letters", "baskets", "old maps", "wooden chairs", "fresh fish", "warm tea",
              "blue paint", "long ropes"],
}
_EN_PATTERNS = [
    "The {adj} {noun} {verb} {place} {time}.",
    "{Time}, the {plural} {verb} {place}.",
    "Many {plural} brought {thing} to {place} {time}.",
    "Nobody knew why the {adj} {noun} liked {thing} so much.",
    "The {noun} near {place} was {adj}, and the {plural} {verb} it {time}.",
    "It is said that the {plural} of the {adj} {noun} never forgot {place}.",
    "{Time}, a {adj} {noun} sold {thing} beside {place}.",
    "The {plural} counted the {thing} and then {verb} {place}.",
]

_KO = {
    "adj": ["조용한", "오래된", "붐비는", "작은", "밝은", "좁은", "푸른", "먼", "따뜻한", "부드러운", "넓은",
            "유명한", "소박한", "신중한", "차분한", "호기심 많은", "무거운", "이른", "늦은", "북쪽의"],
    "noun": ["농부", "선생님", "강", "마을", "시장", "도서관", "제빵사", "여행자", "정원", "항구", "학생",
             "화가", "산", "다리", "부엌", "과수원", "기차역", "숲", "음악가", "어부"],
    "plural": ["농부들", "아이들", "상인들", "학생들", "이웃들", "선원들", "정원사들", "작가들", "방문객들",
               "일꾼들"],
    "verb": ["걸었다", "바라보았다", "이야기했다", "청소했다", "칠했다", "찾아갔다", "고쳤다", "설명했다",
             "지나갔다", "기억했다"],
    "place": ["강가", "옛길", "시장 광장", "언덕", "항구", "학교", "작은 다리", "마을 회관", "기차역", "소나무 숲"],
    "time": ["매일 아침", "봄에", "비가 온 뒤에", "저녁 식사 전에", "조용한 저녁마다", "추수 때에", "초가을에",
             "정오에", "밤늦게", "여름마다"],
    "thing": ["빵", "사과", "편지", "바구니", "낡은 지도", "나무 의자", "싱싱한 생선", "따뜻한 차", "파란 물감",
              "긴 밧줄"],
}
_KO_PATTERNS = [
    "{time} {adj} {noun}{은는} {place}{을를} {verb}.",
    "{time} {plural}{은는} {place}에서 {thing}{을를} 나누었다.",
    "많은 {plural}{이가} {time} {place}{으로로} {thing}{을를} 가져왔다.",
    "{adj} {noun}{이가} 왜 {thing}{을를} 그렇게 좋아했는지 아무도 몰랐다.",
    "{place} 근처의 {noun}{은는} {adj} 곳이었고, {plural}{은는} {time} 그곳을 {verb}.",
    "{adj} {noun}의 {plural}{은는} {place}{을를} 결코 잊지 않았다고 한다.",
    "{time} {adj} {noun}{이가} {place} 옆에서 {thing}{을를} 팔았다.",
    "{plural}{은는} {thing}{을를} 세어 본 뒤 {place}{을를} {verb}.",
]


def _has_final_consonant(word: str) -> bool:
    """Whether a word's last Hangul syllable ends in a consonant (batchim): picks 은/는, 이/가, 을/를."""
    ch = word[-1]
    return 0xAC00 <= ord(ch) <= 0xD7A3 and (ord(ch) - 0xAC00) % 28 != 0


def _ko_particles(pattern: str, words: dict[str, str]) -> str:
    # each particle slot follows the slot it attaches to: "{noun}{은는}"
    out, pos = [], 0
    last = ""
    while pos < len(pattern):
        if pattern[pos] == "{":
            end = pattern.index("}", pos)
            key = pattern[pos + 1:end]
            if key in ("은는", "이가", "을를", "으로로"):
                final = _has_final_consonant(last)
                rieul = (ord(last[-1]) - 0xAC00) % 28 == 8 if 0xAC00 <= ord(last[-1]) <= 0xD7A3 else False
                out.append({"은는": "은" if final else "는", "이가": "이" if final else "가",
                            "을를": "을" if final else "를",
                            "으로로": "으로" if final and not rieul else "로"}[key])
            else:
                last = words[key]
                out.append(last)
            pos = end + 1
        else:
            out.append(pattern[pos])
            pos += 1
    return "".join(out)


def filler_sentences(language: str, seed: int = 0) -> Iterator[str]:
    """An endless stream of filler sentences in `language` ("en" or "ko"), reproducible from `seed`.
    None of them contains a digit, so a numeric needle is the only number in a haystack."""
    if language not in LANGUAGES:
        raise ValueError(f"filler_sentences: language: expected one of {LANGUAGES}, got {language!r}")
    rng = random.Random(f"filler-{language}-{seed}")
    words, patterns = (_EN, _EN_PATTERNS) if language == "en" else (_KO, _KO_PATTERNS)
    while True:
        pattern = rng.choice(patterns)
        chosen = {k: rng.choice(v) for k, v in words.items()}
        if language == "en":
            chosen["Time"] = chosen["time"][0].upper() + chosen["time"][1:]
            yield pattern.format(**chosen)
        else:
            yield _ko_particles(pattern, chosen)
