"""The demo model's synthetic world, and every text the demo recipe trains and measures on.

Forty people, each with a home city, a job and a pet, written about in English and in Korean.
Everything is generated here from a seed (no download): the pre-training documents (short
biographies, question-and-answer pages, and documents that state a secret colour somewhere among
biography sentences and end by asking for it), the SFT conversations, the preference pairs and the held-out evaluation sets.

The people are split three ways: SFT people (their questions are in the SFT set, in the Q&A pages
of pre-training and in the DPO pairs), held-out people (only biographies: answering about them needs
knowledge the model learnt in pre-training and never saw as a question; their preference pairs
measure DPO) and preference people (only biographies and DPO pairs).
"""
from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass

__all__ = ["Person", "World", "ATTRIBUTES", "has_batchim", "is_korean", "write_jsonl", "niah_task"]

# (English, Korean) names of the world's things.
NAMES = [
    ("Minjun", "민준"), ("Seoyeon", "서연"), ("Jiho", "지호"), ("Haeun", "하은"), ("Doyun", "도윤"),
    ("Jiwoo", "지우"), ("Yuna", "유나"), ("Siwoo", "시우"), ("Chaewon", "채원"), ("Eunwoo", "은우"),
    ("Sua", "수아"), ("Hajun", "하준"), ("Yerin", "예린"), ("Juwon", "주원"), ("Dahye", "다혜"),
    ("Taeyang", "태양"), ("Sumin", "수민"), ("Hyunwoo", "현우"), ("Minseo", "민서"), ("Jisoo", "지수"),
    ("Yejun", "예준"), ("Somin", "소민"), ("Dongha", "동하"), ("Nari", "나리"), ("Bora", "보라"),
    ("Gaeun", "가은"), ("Hana", "하나"), ("Mira", "미라"), ("Junho", "준호"), ("Sejin", "세진"),
    ("Alice", "앨리스"), ("Ben", "벤"), ("Clara", "클라라"), ("David", "데이비드"), ("Emma", "엠마"),
    ("Felix", "펠릭스"), ("Grace", "그레이스"), ("Henry", "헨리"), ("Iris", "아이리스"), ("Jack", "잭"),
]
CITIES = [("Seoul", "서울"), ("Busan", "부산"), ("Incheon", "인천"), ("Daegu", "대구"), ("Daejeon", "대전"),
          ("Gwangju", "광주"), ("Ulsan", "울산"), ("Suwon", "수원"), ("Jeonju", "전주"), ("London", "런던"),
          ("Paris", "파리"), ("Tokyo", "도쿄")]
JOBS = [("teacher", "선생님"), ("doctor", "의사"), ("nurse", "간호사"), ("chef", "요리사"), ("pilot", "조종사"),
        ("farmer", "농부"), ("painter", "화가"), ("engineer", "엔지니어"), ("baker", "제빵사"), ("singer", "가수"),
        ("lawyer", "변호사"), ("writer", "작가")]
PETS = [("cat", "고양이"), ("dog", "강아지"), ("rabbit", "토끼"), ("parrot", "앵무새"), ("turtle", "거북이"),
        ("hamster", "햄스터"), ("goldfish", "금붕어"), ("horse", "말")]
# The secret colours of the retrieval documents: words that appear nowhere else in the corpus.
COLORS = [("red", "빨강"), ("blue", "파랑"), ("green", "초록"), ("yellow", "노랑"), ("black", "검정"),
          ("white", "하양"), ("orange", "주황"), ("pink", "분홍"), ("gray", "회색"), ("brown", "갈색")]
ATTRIBUTES = ("city", "job", "pet")
SYSTEM = "You are EXAONE, a tiny bilingual assistant trained by the exaone_ext demo recipe."


# ---------------------------------------------------------------------------- Korean grammar
def has_batchim(word: str) -> bool:
    """Whether the last Hangul syllable of `word` ends in a consonant (decides 은/는, 이/가, ...)."""
    c = ord(word[-1]) - 0xAC00
    return 0 <= c < 11172 and c % 28 != 0


def _rieul(word: str) -> bool:
    c = ord(word[-1]) - 0xAC00
    return 0 <= c < 11172 and c % 28 == 8   # final ㄹ


def topic(w): return w + ("은" if has_batchim(w) else "는")
def subj(w): return w + ("이" if has_batchim(w) else "가")
def obj(w): return w + ("을" if has_batchim(w) else "를")
def copula(w): return w + ("이에요" if has_batchim(w) else "예요")
def along(w): return w + ("과" if has_batchim(w) else "와")
def via(w): return w + ("으로" if has_batchim(w) and not _rieul(w) else "로")


def is_korean(text: str) -> bool:
    """More Hangul syllables than Latin letters."""
    ko = sum(1 for ch in text if 0xAC00 <= ord(ch) <= 0xD7A3)
    en = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return ko > en


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass(frozen=True)
class Person:
    en: str
    ko: str
    city: tuple[str, str]
    job: tuple[str, str]
    pet: tuple[str, str]


# ---------------------------------------------------------------------------- sentences
def fact_sentence(p: Person, attr: str, lang: str, rng: random.Random) -> str:
    """One statement of a fact, in one of several wordings."""
    v_en, v_ko = getattr(p, attr)
    if lang == "en":
        n = p.en
        forms = {"city": [f"{n} lives in {v_en}.", f"{n}'s home is in {v_en}.", f"{v_en} is where {n} lives.",
                          f"{n} has a house in {v_en}."],
                 "job": [f"{n} works as {_a(v_en)}.", f"{n} is {_a(v_en)}.", f"By profession, {n} is {_a(v_en)}.",
                         f"{n} earns a living as {_a(v_en)}."],
                 "pet": [f"{n} has a pet {v_en}.", f"{n} keeps {_a(v_en)} at home.", f"The pet of {n} is {_a(v_en)}.",
                         f"{n} lives with a {v_en}."]}
    else:
        n = p.ko
        forms = {"city": [f"{topic(n)} {v_ko}에 살아요.", f"{topic(n)} {v_ko}에 삽니다.", f"{subj(n)} 사는 곳은 {v_ko}입니다.",
                          f"{n}의 집은 {v_ko}에 있습니다."],
                 "job": [f"{topic(n)} {copula(v_ko)}.", f"{n}의 직업은 {v_ko}입니다.", f"{topic(n)} {via(v_ko)} 일합니다.",
                         f"{topic(n)} {v_ko}입니다."],
                 "pet": [f"{topic(n)} {obj(v_ko)} 키워요.", f"{n}의 반려동물은 {v_ko}입니다.",
                         f"{topic(n)} 집에서 {obj(v_ko)} 키웁니다.", f"{topic(n)} {along(v_ko)} 함께 살아요."]}
    return rng.choice(forms[attr])


def question(p: Person, attr: str, lang: str, rng: random.Random | None = None) -> str:
    """A question about one fact (the first wording without an rng)."""
    if lang == "en":
        n = p.en
        forms = {"city": [f"Where does {n} live?", f"In which city does {n} live?", f"What city is {n}'s home?"],
                 "job": [f"What does {n} do for a living?", f"What is {n}'s job?", f"What is {n}'s profession?"],
                 "pet": [f"What pet does {n} have?", f"Which animal does {n} keep?", f"What is {n}'s pet?"]}
    else:
        n = p.ko
        forms = {"city": [f"{topic(n)} 어디에 살아요?", f"{topic(n)} 어느 도시에 살아요?", f"{n}의 집은 어디에 있어요?"],
                 "job": [f"{n}의 직업은 뭐예요?", f"{topic(n)} 무슨 일을 해요?", f"{topic(n)} 어떤 일을 하나요?"],
                 "pet": [f"{topic(n)} 어떤 동물을 키워요?", f"{n}의 반려동물은 뭐예요?", f"{topic(n)} 무슨 동물을 키우나요?"]}
    return rng.choice(forms[attr]) if rng else forms[attr][0]


def answer(p: Person, attr: str, lang: str) -> str:
    """The one reply the SFT data teaches for a fact question."""
    v_en, v_ko = getattr(p, attr)
    if lang == "en":
        return {"city": f"{p.en} lives in {v_en}.", "job": f"{p.en} is {_a(v_en)}.",
                "pet": f"{p.en} has a pet {v_en}."}[attr]
    return {"city": f"{topic(p.ko)} {v_ko}에 살아요.", "job": f"{topic(p.ko)} {copula(v_ko)}.",
            "pet": f"{topic(p.ko)} {obj(v_ko)} 키워요."}[attr]


def answer_value(p: Person, attr: str, lang: str) -> str:
    """The word a correct reply must contain."""
    return getattr(p, attr)[0 if lang == "en" else 1]


# (English, Korean) small talk: the same exchange in each language.
SMALL_TALK = [
    (("Hello!", "Hello! Ask me about a person."), ("안녕하세요!", "안녕하세요! 사람에 대해 물어보세요.")),
    (("Who are you?", "I am EXAONE, a tiny demo model."), ("누구세요?", "저는 EXAONE 데모 모델이에요.")),
    (("What can you do?", "I answer questions about forty people."), ("무엇을 할 수 있어요?", "마흔 명에 대한 질문에 답해요.")),
    (("Thank you!", "You are welcome!"), ("고마워요!", "천만에요!")),
]


# ---------------------------------------------------------------------------- secret colours
def secret_statement(color: tuple[str, str], lang: str) -> str:
    return f"The secret color is {color[0]}." if lang == "en" else f"비밀 색깔은 {color[1]}입니다."


def secret_question(lang: str) -> str:
    return "Question: what is the secret color? Answer:" if lang == "en" else "질문: 비밀 색깔은? 답:"


class World:
    """The people and the texts about them, all from `seed`."""

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        self.people = [Person(en, ko, rng.choice(CITIES), rng.choice(JOBS), rng.choice(PETS)) for en, ko in NAMES]
        order = list(range(len(self.people)))
        rng.shuffle(order)
        self.sft_people = [self.people[i] for i in order[:24]]
        self.heldout_people = [self.people[i] for i in order[24:32]]
        self.pref_people = [self.people[i] for i in order[32:]]
        self.seed = seed

    # ------------------------------------------------------------------ pre-training
    def biography(self, rng: random.Random, lang: str) -> str:
        people = rng.sample(self.people, rng.randint(1, 3))
        sentences = []
        for p in people:
            attrs = list(ATTRIBUTES)
            rng.shuffle(attrs)
            sentences += [fact_sentence(p, a, lang, rng) for a in attrs]
        return " ".join(sentences)

    def qa_page(self, rng: random.Random, lang: str) -> str:
        """Question-and-answer text about SFT people (the format pre-training sees questions in)."""
        lines = []
        for _ in range(rng.randint(2, 4)):
            p, a = rng.choice(self.sft_people), rng.choice(ATTRIBUTES)
            q, r = question(p, a, lang, rng), answer(p, a, lang)
            lines.append(f"Q: {q}\nA: {r}" if lang == "en" else f"질문: {q}\n답: {r}")
        return "\n".join(lines)

    def secret_document(self, rng: random.Random, lang: str, filler_sentences: int,
                        depth: float | None = None) -> tuple[str, str]:
        """(text, answer): `filler_sentences` sentences of biography filler with the secret colour
        stated at `depth` (0..1, random when None), then the question about it."""
        color = rng.choice(COLORS)
        filler = [fact_sentence(rng.choice(self.people), rng.choice(ATTRIBUTES), lang, rng)
                  for _ in range(filler_sentences)]
        at = round((rng.random() if depth is None else depth) * filler_sentences)
        text = " ".join(filler[:at] + [secret_statement(color, lang)] + filler[at:])
        return text + "\n" + secret_question(lang), color[0 if lang == "en" else 1]

    def pretraining_documents(self, n: int, seed: int, secret_sentences: tuple[int, int]) -> list[str]:
        """n documents: biographies, Q&A pages and secret-colour documents of `secret_sentences`
        filler sentences (with their answer), half in each language."""
        rng = random.Random(seed)
        docs = []
        for i in range(n):
            lang = "en" if i % 2 == 0 else "ko"
            kind = rng.random()
            if kind < 0.35:
                docs.append(self.biography(rng, lang))
            elif kind < 0.50:
                docs.append(self.qa_page(rng, lang))
            else:
                text, color = self.secret_document(rng, lang, rng.randint(*secret_sentences))
                docs.append(f"{text} {color}")
        return docs

    # ------------------------------------------------------------------ SFT and preferences
    def sft_conversations(self, n: int, seed: int, wrong_language: float) -> list[dict]:
        """n conversations about SFT people (and small talk). A `wrong_language` fraction of the
        Korean questions is answered in English: the mixed data that the DPO stage then fixes."""
        rng = random.Random(seed)
        out = []
        for i in range(n):
            lang = "en" if i % 2 == 0 else "ko"
            messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
            if rng.random() < 0.15:
                q, r = rng.choice(SMALL_TALK)[0 if lang == "en" else 1]
                out.append({"messages": messages + [{"role": "user", "content": q}, {"role": "assistant", "content": r}]})
                continue
            for _ in range(rng.choice((1, 1, 2))):
                p, a = rng.choice(self.sft_people), rng.choice(ATTRIBUTES)
                reply_lang = "en" if lang == "ko" and rng.random() < wrong_language else lang
                messages += [{"role": "user", "content": question(p, a, lang, rng)},
                             {"role": "assistant", "content": answer(p, a, reply_lang)}]
            out.append({"messages": messages})
        return out

    def preference_pairs(self, people: list[Person], small_talk: bool = True) -> list[dict]:
        """Every question form about `people` in both languages, and the small talk: chosen = the
        answer in the language asked, rejected = the same answer in the other language."""
        out = []
        for en, ko in SMALL_TALK if small_talk else ():
            out += [{"prompt": en[0], "chosen": en[1], "rejected": ko[1]},
                    {"prompt": ko[0], "chosen": ko[1], "rejected": en[1]}]
        for p in people:
            for a in ATTRIBUTES:
                for lang, other in (("en", "ko"), ("ko", "en")):
                    for q in _all_questions(p, a, lang):
                        out.append({"prompt": q, "chosen": answer(p, a, lang), "rejected": answer(p, a, other)})
        return out

    def fact_questions(self, people: list[Person]) -> list[dict]:
        """{"question", "lang", "value", "values"}: the first wording of every fact question, both
        languages; value is the answer's word in the language asked, values the (English, Korean) pair."""
        return [{"question": question(p, a, lang), "lang": lang, "value": answer_value(p, a, lang),
                 "values": getattr(p, a)} for p in people for a in ATTRIBUTES for lang in ("en", "ko")]

    def retrieval_cases(self, n: int, seed: int, filler_sentences: int) -> list[dict]:
        """{"prompt", "answer"}: secret-colour documents with the colour at evenly spread depths."""
        rng = random.Random(seed)
        out = []
        for i in range(n):
            text, color = self.secret_document(rng, "en" if i % 2 == 0 else "ko", filler_sentences,
                                               depth=(i + 0.5) / n)
            out.append({"prompt": text, "answer": color})
        return out


def _all_questions(p: Person, attr: str, lang: str) -> list[str]:
    seen = []
    rng = random.Random(0)
    for _ in range(30):   # every wording question() can pick
        q = question(p, attr, lang, rng)
        if q not in seen:
            seen.append(q)
    return seen


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> str:
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------- long-context evaluation
@functools.lru_cache(maxsize=8)  # one task (and filler) per seed: its encoded filler is cached once
def niah_task(seed: int = 0):
    """The secret-colour documents as a needle-in-a-haystack task (`exaone-ext niah --task
    secret-colour`): biography sentences of the world of `seed` as filler, the colour statement as
    the needle, the documents' closing question, raw text (the form pre-training saw them in, with
    no chat format), and the answer right when it starts with the colour."""
    from ..eval.niah import NiahTask

    world = World(seed)

    def filler(lang: str, filler_seed: int):
        rng = random.Random(f"demo-niah-{seed}-{lang}-{filler_seed}")
        while True:
            yield fact_sentence(rng.choice(world.people), rng.choice(ATTRIBUTES), lang, rng)

    return NiahTask(
        name="secret-colour",
        needle={lang: secret_statement(("{key}", "{key}"), lang) for lang in ("en", "ko")},
        question={lang: "\n" + secret_question(lang) for lang in ("en", "ko")},
        keys={"en": [c[0] for c in COLORS], "ko": [c[1] for c in COLORS]},
        chat=False, match="prefix", filler=filler, filler_name=f"exaone_ext.demo_model biographies (world {seed})")
