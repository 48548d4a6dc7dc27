"""The synthetic catalogue's vocabulary: attribute values, how they combine, and how text names them.

Canonical values are English; `WORDS[lang]` renders them in a product's text, the `QUERY_*` tables and
`STYLE_PHRASES` in how shoppers type queries. Pure data plus two look-ups, shared by the sampler
(latents.py), the text writer (text.py), the renderer and the query generator.
"""

from __future__ import annotations

# Attributes an image shows, and those only text carries (in the order text and queries name them).
VISUAL_ATTRS = ("primary_color", "pattern", "style")
TEXTUAL_ATTRS = ("material", "care", "size")

CATEGORIES = ("dress", "t-shirt", "jacket", "trousers", "shorts", "skirt", "shoe", "bag", "hat", "scarf")

STYLES = {
    "dress": ("sleeveless", "short sleeve", "long sleeve"),
    "t-shirt": ("crew neck", "v-neck", "pocket"),
    "jacket": ("zip-up", "buttoned", "hooded"),
    "trousers": ("straight leg", "wide leg", "belted"),
    "shorts": ("cargo", "drawstring", "cuffed"),
    "skirt": ("mini", "midi", "pleated"),
    "shoe": ("sneaker", "heeled", "ankle boot"),
    "bag": ("tote", "crossbody", "clutch"),
    "hat": ("cap", "beanie", "sun hat"),
    "scarf": ("fringed", "square", "infinity"),
}

# RGB chosen pairwise >= ~90 apart so that "is this pixel red?" has one answer under lighting changes.
COLORS = {
    "red": (210, 30, 40),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 40),
    "green": (40, 150, 60),
    "blue": (35, 75, 200),
    "purple": (125, 50, 165),
    "pink": (245, 140, 190),
    "brown": (115, 70, 35),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "grey": (130, 130, 135),
}
COLOR_NAMES = tuple(COLORS)
COLOR_NEIGHBOURS = {
    "red": ("orange", "pink"), "orange": ("red", "yellow", "brown"), "yellow": ("orange",),
    "green": ("yellow",), "blue": ("purple",), "purple": ("blue", "pink"), "pink": ("red", "purple"),
    "brown": ("orange", "black"), "black": ("grey", "brown"), "white": ("grey",),
    "grey": ("white", "black"),
}

PATTERNS = ("solid", "striped", "dotted", "checked", "floral")
PATTERN_PROBS = (0.36, 0.16, 0.16, 0.16, 0.16)
PATTERN_NEIGHBOURS = {"solid": (), "striped": ("checked",), "checked": ("striped",),
                      "dotted": ("floral",), "floral": ("dotted",)}

MATERIALS = {
    "dress": ("cotton", "linen", "silk", "viscose", "polyester"),
    "t-shirt": ("cotton", "linen", "polyester", "viscose"),
    "jacket": ("denim", "leather", "wool", "polyester", "cotton"),
    "trousers": ("cotton", "denim", "linen", "wool", "polyester"),
    "shorts": ("cotton", "denim", "linen", "polyester"),
    "skirt": ("cotton", "denim", "silk", "wool", "viscose"),
    "shoe": ("leather", "suede", "canvas", "synthetic"),
    "bag": ("leather", "canvas", "nylon", "suede"),
    "hat": ("wool", "cotton", "straw", "polyester"),
    "scarf": ("wool", "cashmere", "silk", "cotton", "polyester"),
}
MATERIAL_NEIGHBOURS = {
    "cotton": ("linen",), "linen": ("cotton",), "silk": ("viscose",), "viscose": ("silk", "polyester"),
    "polyester": ("viscose", "nylon"), "denim": ("cotton",), "leather": ("suede",), "suede": ("leather",),
    "wool": ("cashmere",), "cashmere": ("wool",), "canvas": ("nylon",), "nylon": ("canvas", "polyester"),
    "synthetic": ("polyester",), "straw": (),
}
# Near values per query attribute: an S grade for a one-attribute query ("red dress" -> a pink dress).
NEIGHBOURS = {"primary_color": COLOR_NEIGHBOURS, "pattern": PATTERN_NEIGHBOURS, "material": MATERIAL_NEIGHBOURS}
CARES = ("machine washable", "hand wash only", "dry clean only", "wipe clean")
# Care follows material the way real labels do; the rest of the mass keeps it from being implied.
CARE_PROBS = {
    "cotton": (0.8, 0.2, 0, 0), "linen": (0.6, 0.2, 0.2, 0), "polyester": (0.9, 0.1, 0, 0),
    "silk": (0, 0.4, 0.6, 0), "denim": (1, 0, 0, 0), "wool": (0, 0.6, 0.4, 0),
    "cashmere": (0, 0.5, 0.5, 0), "viscose": (0.4, 0.6, 0, 0), "leather": (0, 0, 0.3, 0.7),
    "suede": (0, 0, 0.3, 0.7), "canvas": (0.5, 0, 0, 0.5), "nylon": (0.4, 0, 0, 0.6),
    "synthetic": (0, 0, 0, 1), "straw": (0, 0, 0, 1),
}
CLOTHING_SIZES = ("XS", "S", "M", "L", "XL")
SIZES = {
    **{c: CLOTHING_SIZES for c in ("dress", "t-shirt", "jacket", "trousers", "shorts", "skirt")},
    "shoe": tuple(str(s) for s in range(36, 46)),
    "hat": ("S", "M", "L"),
    "bag": ("one size",),
    "scarf": ("one size",),
}
GENDERS = ("women", "men", "unisex")
SEASONS = ("summer", "winter", "spring", "autumn")
BRANDS = ("Norvik", "Alba & Co", "Urbanline", "Maison Lune", "Kestrel", "Tidewell", "Fjordhaus",
          "Casa Sol", "Northmark", "Lumen", "Brightfield", "Oakridge Supply", "Vela", "Juniper Lane")

COMPLEMENTS = {
    "dress": ("shoe", "bag", "hat"), "t-shirt": ("trousers", "shorts", "skirt"),
    "jacket": ("trousers", "scarf", "hat"), "trousers": ("t-shirt", "jacket", "shoe"),
    "shorts": ("t-shirt", "shoe", "hat"), "skirt": ("t-shirt", "shoe", "bag"),
    "shoe": ("dress", "trousers", "bag"), "bag": ("dress", "shoe", "scarf"),
    "hat": ("scarf", "jacket", "dress"), "scarf": ("jacket", "hat", "bag"),
}

# Query phrases where "<style> <category>" is not what people type.
STYLE_PHRASES = {
    ("shoe", "sneaker"): ("sneakers",), ("shoe", "heeled"): ("heels", "heeled shoes"),
    ("shoe", "ankle boot"): ("ankle boots",), ("bag", "tote"): ("tote bag", "tote"),
    ("bag", "crossbody"): ("crossbody bag",), ("bag", "clutch"): ("clutch", "clutch bag"),
    ("hat", "cap"): ("cap", "baseball cap"), ("hat", "beanie"): ("beanie",), ("hat", "sun hat"): ("sun hat",),
    ("t-shirt", "pocket"): ("pocket t-shirt", "t-shirt with pocket"),
    ("trousers", "belted"): ("belted trousers", "trousers with belt"),
}
QUERY_CATEGORY = {
    "dress": ("dress",), "t-shirt": ("t-shirt", "tee", "t shirt"), "jacket": ("jacket",),
    "trousers": ("trousers", "pants"), "shorts": ("shorts",), "skirt": ("skirt",),
    "shoe": ("shoes",), "bag": ("bag", "handbag"), "hat": ("hat",), "scarf": ("scarf",),
}
QUERY_COLOR = {c: (c,) for c in COLORS} | {"grey": ("grey", "gray")}
QUERY_PATTERN = {"solid": ("plain", "solid"), "striped": ("striped", "stripe"),
                 "dotted": ("polka dot", "dotted"), "checked": ("checked", "plaid", "check"),
                 "floral": ("floral", "flower print")}

# Text vocabulary per language. en is also the canonical key space.
WORDS: dict[str, dict[str, dict[str, str]]] = {
    "en": {
        "category": {"dress": "Dress", "t-shirt": "T-Shirt", "jacket": "Jacket", "trousers": "Trousers",
                     "shorts": "Shorts", "skirt": "Skirt", "shoe": "Shoes", "bag": "Bag", "hat": "Hat",
                     "scarf": "Scarf"},
        "color": {"red": "Red", "orange": "Orange", "yellow": "Yellow", "green": "Green", "blue": "Blue",
                  "purple": "Purple", "pink": "Pink", "brown": "Brown", "black": "Black", "white": "White",
                  "grey": "Grey"},
        "pattern": {"solid": "Plain", "striped": "Striped", "dotted": "Polka Dot", "checked": "Checked",
                    "floral": "Floral"},
        "style": {"sleeveless": "Sleeveless", "short sleeve": "Short Sleeve", "long sleeve": "Long Sleeve",
                  "crew neck": "Crew Neck", "v-neck": "V-Neck", "pocket": "Pocket", "zip-up": "Zip-Up",
                  "buttoned": "Buttoned", "hooded": "Hooded", "straight leg": "Straight Leg",
                  "wide leg": "Wide Leg", "belted": "Belted", "cargo": "Cargo", "drawstring": "Drawstring",
                  "cuffed": "Cuffed", "mini": "Mini", "midi": "Midi", "pleated": "Pleated",
                  "sneaker": "Sneaker", "heeled": "Heeled", "ankle boot": "Ankle Boot", "tote": "Tote",
                  "crossbody": "Crossbody", "clutch": "Clutch", "cap": "Cap", "beanie": "Beanie",
                  "sun hat": "Sun Hat", "fringed": "Fringed", "square": "Square", "infinity": "Infinity"},
        "material": {"cotton": "cotton", "linen": "linen", "silk": "silk", "viscose": "viscose",
                     "polyester": "polyester", "denim": "denim", "leather": "leather", "wool": "wool",
                     "suede": "suede", "canvas": "canvas", "synthetic": "synthetic", "nylon": "nylon",
                     "straw": "straw", "cashmere": "cashmere"},
        "care": {"machine washable": "machine washable", "hand wash only": "hand wash only",
                 "dry clean only": "dry clean only", "wipe clean": "wipe clean"},
        "size": {"one size": "one size"},
        "gender": {"women": "Women", "men": "Men", "unisex": "Unisex"},
        "gender_possessive": {"women": "Women's", "men": "Men's", "unisex": "Unisex"},
        "season": {"summer": "Summer", "winter": "Winter", "spring": "Spring", "autumn": "Autumn"},
        "key": {"brand": "brand", "material": "material", "care": "care", "size": "size", "color": "color",
                "pattern": "pattern", "gender": "gender", "fit": "fit"},
    },
    "de": {
        "category": {"dress": "Kleid", "t-shirt": "T-Shirt", "jacket": "Jacke", "trousers": "Hose",
                     "shorts": "Shorts", "skirt": "Rock", "shoe": "Schuhe", "bag": "Tasche", "hat": "Hut",
                     "scarf": "Schal"},
        "color": {"red": "Rot", "orange": "Orange", "yellow": "Gelb", "green": "Grün", "blue": "Blau",
                  "purple": "Lila", "pink": "Rosa", "brown": "Braun", "black": "Schwarz", "white": "Weiß",
                  "grey": "Grau"},
        "pattern": {"solid": "Uni", "striped": "Gestreift", "dotted": "Gepunktet", "checked": "Kariert",
                    "floral": "Geblümt"},
        "style": {"sleeveless": "Ärmellos", "short sleeve": "Kurzarm", "long sleeve": "Langarm",
                  "crew neck": "Rundhals", "v-neck": "V-Ausschnitt", "pocket": "mit Brusttasche",
                  "zip-up": "mit Reißverschluss", "buttoned": "mit Knöpfen", "hooded": "mit Kapuze",
                  "straight leg": "Gerades Bein", "wide leg": "Weites Bein", "belted": "mit Gürtel",
                  "cargo": "Cargo", "drawstring": "mit Kordelzug", "cuffed": "mit Umschlag", "mini": "Mini",
                  "midi": "Midi", "pleated": "Plissee", "sneaker": "Sneaker", "heeled": "mit Absatz",
                  "ankle boot": "Stiefelette", "tote": "Shopper", "crossbody": "Umhänge",
                  "clutch": "Clutch", "cap": "Cap", "beanie": "Strickmütze", "sun hat": "Sonnenhut",
                  "fringed": "mit Fransen", "square": "Quadratisch", "infinity": "Loop"},
        "material": {"cotton": "Baumwolle", "linen": "Leinen", "silk": "Seide", "viscose": "Viskose",
                     "polyester": "Polyester", "denim": "Denim", "leather": "Leder", "wool": "Wolle",
                     "suede": "Wildleder", "canvas": "Canvas", "synthetic": "Synthetik", "nylon": "Nylon",
                     "straw": "Stroh", "cashmere": "Kaschmir"},
        "care": {"machine washable": "maschinenwaschbar", "hand wash only": "nur Handwäsche",
                 "dry clean only": "nur chemische Reinigung", "wipe clean": "feucht abwischen"},
        "size": {"one size": "Einheitsgröße"},
        "gender": {"women": "Damen", "men": "Herren", "unisex": "Unisex"},
        "gender_possessive": {"women": "Damen", "men": "Herren", "unisex": "Unisex"},
        "season": {"summer": "Sommer", "winter": "Winter", "spring": "Frühling", "autumn": "Herbst"},
        "key": {"brand": "Marke", "material": "Material", "care": "Pflege", "size": "Größe", "color": "Farbe",
                "pattern": "Muster", "gender": "Abteilung", "fit": "Passform"},
    },
    "es": {
        "category": {"dress": "Vestido", "t-shirt": "Camiseta", "jacket": "Chaqueta", "trousers": "Pantalones",
                     "shorts": "Pantalones cortos", "skirt": "Falda", "shoe": "Zapatos", "bag": "Bolso",
                     "hat": "Sombrero", "scarf": "Bufanda"},
        "color": {"red": "rojo", "orange": "naranja", "yellow": "amarillo", "green": "verde", "blue": "azul",
                  "purple": "morado", "pink": "rosa", "brown": "marrón", "black": "negro", "white": "blanco",
                  "grey": "gris"},
        "pattern": {"solid": "liso", "striped": "de rayas", "dotted": "de lunares", "checked": "de cuadros",
                    "floral": "de flores"},
        "style": {"sleeveless": "sin mangas", "short sleeve": "manga corta", "long sleeve": "manga larga",
                  "crew neck": "cuello redondo", "v-neck": "cuello de pico", "pocket": "con bolsillo",
                  "zip-up": "con cremallera", "buttoned": "con botones", "hooded": "con capucha",
                  "straight leg": "pierna recta", "wide leg": "pierna ancha", "belted": "con cinturón",
                  "cargo": "cargo", "drawstring": "con cordón", "cuffed": "con dobladillo", "mini": "mini",
                  "midi": "midi", "pleated": "plisada", "sneaker": "deportivas", "heeled": "de tacón",
                  "ankle boot": "botines", "tote": "shopper", "crossbody": "bandolera", "clutch": "de mano",
                  "cap": "gorra", "beanie": "gorro de punto", "sun hat": "pamela", "fringed": "con flecos",
                  "square": "cuadrado", "infinity": "infinito"},
        "material": {"cotton": "algodón", "linen": "lino", "silk": "seda", "viscose": "viscosa",
                     "polyester": "poliéster", "denim": "vaquero", "leather": "piel", "wool": "lana",
                     "suede": "ante", "canvas": "lona", "synthetic": "sintético", "nylon": "nailon",
                     "straw": "paja", "cashmere": "cachemira"},
        "care": {"machine washable": "lavable a máquina", "hand wash only": "solo lavado a mano",
                 "dry clean only": "solo limpieza en seco", "wipe clean": "limpiar con paño húmedo"},
        "size": {"one size": "talla única"},
        "gender": {"women": "mujer", "men": "hombre", "unisex": "unisex"},
        "gender_possessive": {"women": "mujer", "men": "hombre", "unisex": "unisex"},
        "season": {"summer": "verano", "winter": "invierno", "spring": "primavera", "autumn": "otoño"},
        "key": {"brand": "marca", "material": "material", "care": "cuidado", "size": "talla", "color": "color",
                "pattern": "estampado", "gender": "sección", "fit": "corte"},
    },
}

# Sentences that carry no attribute: what fills real descriptions. No colour words in any language.
FILLER = {
    "en": ("A wardrobe essential.", "Designed for everyday comfort.", "Our bestseller, back in stock.",
           "Easy to combine with your favourite pieces.", "Made to last.", "Relaxed fit.",
           "Perfect for the weekend."),
    "de": ("Ein Basic für jeden Tag.", "Bequem und vielseitig kombinierbar.", "Unser Bestseller.",
           "Lässige Passform.", "Ideal für das Wochenende."),
    "es": ("Un básico imprescindible.", "Cómodo para el día a día.", "Nuestro más vendido.",
           "Corte relajado.", "Perfecto para el fin de semana."),
}
SENTENCES = {
    "en": {"material": "Made from {material}.", "care": "Care: {care}.", "size": "Size {size}.",
           "season": "Perfect for {season}."},
    "de": {"material": "Material: {material}.", "care": "Pflegehinweis: {care}.", "size": "Größe {size}.",
           "season": "Ideal für den {season}."},
    "es": {"material": "Fabricado en {material}.", "care": "Cuidado: {care}.", "size": "Talla {size}.",
           "season": "Ideal para {season}."},
}


def words_for(lang: str, kind: str, value: str) -> str:
  """Returns `value` (canonical English) as written in `lang`'s text, e.g. ("de", "color", "red") -> "Rot"."""
  table = WORDS[lang].get(kind, {})
  return table.get(value, value)


def color_words() -> dict[str, set[str]]:
  """Returns, per canonical colour, every lowercase word that names it in any language of `WORDS`."""
  out = {c: set() for c in COLORS}
  for lang in WORDS:
    for c, w in WORDS[lang]["color"].items():
      out[c].add(w.lower())
  out["grey"].add("gray")
  return out

