"""Units: what a dropped unit word was, so that 5 km and 5 cm (or 2 million and 2) differ.

The parser (rewards/parse.py) drops unit words after a value and records their `unit_key`s (and
"dollar" for \\$) in `Parsed.units`; the grader (rewards/math.py) compares two values only when
`units_agree`. Scale words (million) must match exactly; other units only when both sides carry
some: 5 km is not 5 cm, \\$5 is not 5 cents, but 5 and 5 cm compare their values.
"""

from __future__ import annotations

SCALE_WORDS = frozenset(("hundred", "thousand", "million", "billion", "trillion"))
_UNIT_SYNONYMS = {  # one key per unit: its spellings
  "meter": "m meter meters metre metres",
  "cm": "cm centimeter centimeters centimetre centimetres",
  "mm": "mm millimeter millimeters millimetre millimetres",
  "km": "km kilometer kilometers kilometre kilometres",
  "inch": "in inch inches",
  "foot": "ft foot feet",
  "yard": "yd yard yards",
  "mile": "mi mile miles",
  "gram": "g gram grams",
  "kg": "kg kilogram kilograms",
  "mg": "mg milligram milligrams",
  "ml": "ml milliliter milliliters millilitre millilitres",
  "liter": "l liter liters litre litres",
  "pound": "lb lbs pound pounds",
  "ounce": "oz ounce ounces",
  "gallon": "gal gallon gallons",
  "second": "s sec secs second seconds",
  "minute": "min mins minute minutes",
  "hour": "h hr hrs hour hours",
  "dollar": "dollar dollars",
  "cent": "cent cents",
  "person": "people person persons",
  "box": "box boxes",
}
_UNIT_KEYS = {name: key for key, names in _UNIT_SYNONYMS.items() for name in names.split()}


def unit_key(words: str) -> str:
  """One spelling per unit: lower case, synonyms and plurals merged (meters, metre, m: meter)."""
  out = []
  for w in words.lower().replace("-", " ").split():
    if w not in _UNIT_KEYS and len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
      w = w[:-1]  # apples, ways, units
    out.append(_UNIT_KEYS.get(w, w))
  return " ".join(out)


def units_agree(gold: frozenset, answer: frozenset) -> bool:
  """Whether two answers' units allow comparing their values: scale words (million) must be the
  same on both sides; other units must be the same when both sides carry some (5 km is not
  5 cm, \\$5 is not 5 cents); a unit on one side only compares the values (5 vs 5 cm)."""
  if gold & SCALE_WORDS != answer & SCALE_WORDS:
    return False
  g, a = gold - SCALE_WORDS, answer - SCALE_WORDS
  return not (g and a and g != a)
