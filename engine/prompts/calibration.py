"""A fixed calibration set: what ``quantize="int8"`` runs once at load to measure each linear layer's
input ranges (SmoothQuant). Fixed, so the same model quantizes to the same weights every time.

Varied ordinary prose (questions, facts, instructions, lists, numbers, a little code and other
languages), short and long, as retrieval traffic is; each template lays it out in its own prompt.
"""
from typing import List

CALIBRATION_QUERIES = [
    "What is the capital of China?",
    "how do vaccines train the immune system",
    "best way to store fresh basil",
    "When did the Berlin Wall fall, and why?",
    "python sort a list of dictionaries by a key",
    "symptoms of vitamin D deficiency in adults",
    "Quelle est la hauteur de la tour Eiffel ?",
    "¿Cuántos habitantes tiene Madrid?",
]

CALIBRATION_PASSAGES = [
    "Beijing is the capital of the People's Republic of China. With over 21 million residents, it is one of "
    "the most populous cities in the world and the country's political and cultural centre.",
    "Vaccines expose the immune system to a harmless piece or weakened form of a pathogen. B cells learn to make "
    "antibodies against it, and memory cells remain for years, so a later infection is fought off quickly.",
    "Trim the stems, place the basil in a glass of water like cut flowers and keep it on the counter, away from "
    "direct sun. Refrigeration turns the leaves black within a day or two.",
    "The Berlin Wall fell on 9 November 1989, after weeks of mass protests in East Germany and a botched "
    "announcement that citizens could cross the border freely, effective immediately.",
    "Use sorted(items, key=lambda d: d['age']) to get a new list, or items.sort(key=operator.itemgetter('age')) "
    "to sort in place; pass reverse=True for descending order.",
    "Fatigue, bone pain, muscle weakness and frequent infections can all point to low vitamin D. A blood test "
    "measuring 25-hydroxyvitamin D confirms it; levels below 20 ng/mL are usually treated.",
    "La tour Eiffel mesure 330 mètres avec ses antennes. Construite pour l'Exposition universelle de 1889, elle "
    "fut la plus haute structure du monde pendant plus de quarante ans.",
    "Madrid tiene alrededor de 3,3 millones de habitantes en la ciudad y más de 6,7 millones en su área "
    "metropolitana, lo que la convierte en la mayor ciudad de España.",
    "Quarterly revenue rose 12% to $4.2 billion, driven by cloud services (+31%) and advertising (+8%); operating "
    "margin narrowed to 27.4% from 29.1% a year earlier.",
    "The mitochondrion is the powerhouse of the cell: it converts nutrients into ATP through oxidative "
    "phosphorylation along the inner membrane.",
    "1. Preheat the oven to 200 °C. 2. Toss the vegetables in olive oil and salt. 3. Roast for 35 minutes, turning "
    "once, until the edges are brown.",
    "Photosynthesis is unrelated to the question above; plants convert light, water and carbon dioxide into "
    "glucose and oxygen.",
]


def calibration_texts() -> List[str]:
    return CALIBRATION_QUERIES + CALIBRATION_PASSAGES


def calibration_seqs(template, task: str):
    """The calibration set in ``template``'s prompt: every query against every passage for a reranker
    (pairs), every text for an embedder."""
    if task == "embed":
        return template.encode(calibration_texts())
    pairs = [(q, p) for q in CALIBRATION_QUERIES for p in CALIBRATION_PASSAGES]
    return template.encode([q for q, _ in pairs], [p for _, p in pairs])
