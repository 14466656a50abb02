"""How files are read: delimiter sniffing, header detection, encodings, overrides, descriptions."""

import json

import pytest

from tunesmith.data.formats import DataError, _delimiter_score, detect_format, read_table, read_text, sniff_delimiter

# ------------------------------------------------------------------------------------------
# Delimiters


QUOTED_CSV = (
    '"1","Stocks; bonds; gold: a week; in review","Traders said; prices, rose"\n'
    '"2","Oil, gas and coal","He said ""sell"", then left"\n'
    '"3","Two lines","First line\nsecond line, still quoted"\n'
    '"4","Plain","a, b, c"\n'
)


def test_quoted_csv_is_comma_separated_though_its_first_line_has_more_semicolons(tmp_path):
    first_line = QUOTED_CSV.split("\n", 1)[0]
    assert first_line.count(";") > first_line.count(",")  # the old first-line count picked ';'
    p = tmp_path / "news.csv"
    p.write_text(QUOTED_CSV, encoding="utf-8")
    t = read_table(p)
    assert (t.format, t.delimiter, t.header) == ("csv", ",", False)
    assert t.columns == ["column_0", "column_1", "column_2"]
    assert [r.line for r in t.rows] == [1, 2, 3, 5]  # the line each record starts on
    assert [r.values for r in t.rows] == [
        {"column_0": "1", "column_1": "Stocks; bonds; gold: a week; in review", "column_2": "Traders said; prices, rose"},
        {"column_0": "2", "column_1": "Oil, gas and coal", "column_2": 'He said "sell", then left'},
        {"column_0": "3", "column_1": "Two lines", "column_2": "First line\nsecond line, still quoted"},
        {"column_0": "4", "column_1": "Plain", "column_2": "a, b, c"},
    ]


def test_sniff_delimiter_scores_consistency_over_records():
    assert sniff_delimiter(QUOTED_CSV, ";") == ","
    assert sniff_delimiter("a;b;c\n1;2,5;3\n4;5;6\n", ",") == ";"  # a comma in one value does not win
    assert sniff_delimiter("a|b\nc|d\ne|f\n", ",") == "|"
    assert sniff_delimiter("a\tb\nc\td\n", ",") == "\t"
    assert sniff_delimiter("just text\nmore text\n", ",") == ","  # nothing splits: the default
    assert sniff_delimiter("just text\nmore text\n", "\t") == "\t"
    assert sniff_delimiter("a,b;c\nd,e;f\n", ";") == ";"  # a tie goes to the default
    # the sample may end inside a record: the cut record does not count, a complete last one does
    assert _delimiter_score("a,b\nc,d\ne", ",") == (1.0, 2)
    assert _delimiter_score("a,b\nc,d\ne\n", ",") == (2 / 3, 2)
    assert _delimiter_score('"a;b",c\n"d;e",f\n', ";") == (0.0, 0)  # quoted ';' do not split


def test_tsv_keeps_quotes_as_text(tmp_path):
    p = tmp_path / "sms.tsv"
    p.write_text('ham\tHe said "hi\nspam\tWin "big" prizes, now; really\nham\tok\n', encoding="utf-8")
    t = read_table(p)
    assert (t.format, t.delimiter, t.header) == ("tsv", "\t", False)
    assert [r.values for r in t.rows] == [
        {"column_0": "ham", "column_1": 'He said "hi'},
        {"column_0": "spam", "column_1": 'Win "big" prizes, now; really'},
        {"column_0": "ham", "column_1": "ok"},
    ]


# ------------------------------------------------------------------------------------------
# Headers


def test_headerless_news_csv_and_the_same_with_a_header(tmp_path):
    rows = (
        '3,"Wall St. Bears Claw Back Into the Black (Reuters)","Reuters - Short-sellers, Wall Street\'s dwindling band '
        'of ultra-cynics, are seeing green again."\n'
        '3,"Carlyle Looks Toward Commercial Aerospace (Reuters)","Reuters - Private investment firm Carlyle Group, '
        'which has a reputation for making well-timed deals."\n'
        '4,"Oil and Economy","Oil prices soar, ending a week of losses."\n'
    )
    bare = tmp_path / "bare.csv"
    bare.write_text(rows, encoding="utf-8")
    t = read_table(bare)
    assert (t.delimiter, t.header, t.columns, len(t.rows)) == (",", False, ["column_0", "column_1", "column_2"], 3)
    assert t.rows[0].values["column_1"] == "Wall St. Bears Claw Back Into the Black (Reuters)"
    assert t.rows[2].values == {"column_0": "4", "column_1": "Oil and Economy",
                                "column_2": "Oil prices soar, ending a week of losses."}
    named = tmp_path / "named.csv"
    named.write_text("label,title,description\n" + rows, encoding="utf-8")
    t = read_table(named)
    assert (t.header, t.columns, len(t.rows)) == (True, ["label", "title", "description"], 3)
    assert t.rows[0].line == 2 and t.rows[0].values["label"] == "3"


def test_header_of_unknown_names_over_numbers(tmp_path):
    p = tmp_path / "scores.csv"
    p.write_text("tweet,score\nI love it,0.9\nnot great at all,0.2\n", encoding="utf-8")
    t = read_table(p)
    assert t.header is True and [r.values for r in t.rows] == [{"tweet": "I love it", "score": "0.9"},
                                                               {"tweet": "not great at all", "score": "0.2"}]


# ------------------------------------------------------------------------------------------
# Encodings

CP1252_LINES = [
    ("1", "Não gostei… “péssimo” – não recomendo"),
    ("0", "Señor, ¡qué bien! ‘ótimo’ — ação"),
    ("1", "O serviço foi lento e a comida chegou fria."),
    ("0", "¡Qué maravilla! El café estaba perfecto • volveré"),
    ("1", "Atenção: o produto veio com defeito — péssima experiência"),
    ("0", "Muy buena atención, la señora fue amabilísima"),
    ("1", "Não funciona… devolvi no mesmo dia"),
    ("0", "Excelente relação custo–benefício, recomendo!"),
    ("1", "El envío tardó tres semanas; ‘nunca más’"),
    ("0", "Ótimo atendimento, parabéns à equipe “nota dez”"),
]


def _csv_bytes(lines, encoding):
    return "".join(f'{label},"{text}"\n' for label, text in lines).encode(encoding)


def test_windows_1252_csv_is_read_as_cp1252(tmp_path):
    raw = _csv_bytes(CP1252_LINES, "cp1252")
    for byte in (0x85, 0x91, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0xE3, 0xF1, 0xEA, 0xE7, 0xE9):
        assert bytes([byte]) in raw  # the test file holds the bytes that tell the code pages apart
    p = tmp_path / "reviews.csv"
    p.write_bytes(raw)
    t = read_table(p)
    assert t.encoding == "cp1252" and 0.5 <= t.encoding_confidence <= 1
    assert [(r.values["column_0"], r.values["column_1"]) for r in t.rows] == CP1252_LINES
    texts = " ".join(r.values["column_1"] for r in t.rows)
    assert "não" in texts and "năo" not in texts and "ń" not in texts
    assert t.describe() == ("csv, delimiter ',', no header: columns column_0..column_1; encoding cp1252 "
                            f"(detected, confidence {t.encoding_confidence:.2f}; set data.encoding to override)")


def test_a_few_short_cp1252_lines_are_cp1252(tmp_path):
    lines = [("1", "Não gostei… “péssimo”"), ("0", "Señor ‘ótimo’ — ação")]
    p = tmp_path / "short.csv"
    p.write_bytes(_csv_bytes(lines, "cp1252"))
    t = read_table(p)
    assert t.encoding == "cp1252"
    assert [(r.values["column_0"], r.values["column_1"]) for r in t.rows] == lines


def test_latin_1_text_is_reported_as_cp1252(tmp_path):
    # no byte in 0x80-0x9F: latin-1 and cp1252 read it alike; the label is the Web's, windows-1252
    text = "Café crème à la française, où est la fenêtre?\nEl niño está aquí.\n"
    p = tmp_path / "fr.txt"
    p.write_bytes(text.encode("latin-1"))
    assert read_text(p) == (text, "cp1252")


@pytest.mark.parametrize("text", [
    "Příliš žluťoučký kůň úpěl ďábelské ódy.\nNa kopci stál starý hrad, kde žili šťastní lidé.\n",
    "Dobrý den, jak se máte? Děkuji, mám se dobře.\nČeština je krásný jazyk, řekl učitel.\n",
    "Zażółć gęślą jaźń.\nWczoraj byłem w sklepie i kupiłem chleb.\nŻółta żaba skacze po łące.\n",
], ids=["czech", "czech-without-t-caron", "polish"])
def test_central_european_cp1250_stays_cp1250(tmp_path, text):
    p = tmp_path / "cs.txt"
    p.write_bytes(text.encode("cp1250"))
    assert read_text(p) == (text, "cp1250")


def test_utf8_has_no_confidence_and_a_plain_description(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "não", "label": "1"}, ensure_ascii=False) + "\n", encoding="utf-8")
    t = read_table(p)
    assert (t.encoding, t.encoding_confidence, t.delimiter, t.header) == ("utf-8", None, None, None)
    assert t.describe() == "jsonl, utf-8"
    q = tmp_path / "d.csv"
    q.write_bytes("\ufefftext;label\nhello;1\n".encode("utf-8"))  # a BOM is dropped
    t = read_table(q)
    assert t.describe() == "csv, delimiter ';', header: columns text, label; utf-8"
    assert t.rows[0].values == {"text": "hello", "label": "1"}


# ------------------------------------------------------------------------------------------
# Overrides


def test_encoding_override(tmp_path):
    text = "1,Příliš žluťoučký kůň\n0,Zažółć\n"
    p = tmp_path / "cz.csv"
    p.write_bytes(text.encode("cp1250"))
    t = read_table(p, encoding="windows-1250")
    assert (t.encoding, t.encoding_confidence, t.encoding_set) == ("cp1250", None, True)
    assert [r.values["column_1"] for r in t.rows] == ["Příliš žluťoučký kůň", "Zažółć"]
    assert t.describe() == ("csv, delimiter ',', no header: columns column_0..column_1; "
                            "encoding cp1250 (set by data.encoding)")
    assert read_text(p, encoding="cp1250") == (text, "cp1250")
    # forced cp1252 reads these bytes (no undefined one here) as cp1252, as asked
    q = tmp_path / "pt.csv"
    q.write_bytes("1,não\n".encode("cp1252"))
    assert read_table(q, encoding="cp1250").rows[0].values["column_1"] == "năo"


def test_encoding_override_errors_name_the_setting_file_and_line(tmp_path):
    p = tmp_path / "pt.csv"
    p.write_bytes("1,ok\n0,fine\n1,não\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"pt\.csv: data\.encoding 'no-such-codec' is not a known text encoding"):
        read_table(p, encoding="no-such-codec")
    with pytest.raises(DataError, match=r"pt\.csv: data\.encoding 'base64' is not a known text encoding"):
        read_table(p, encoding="base64")
    with pytest.raises(DataError, match=r"pt\.csv:3: byte 0xe3 is not valid utf-8 \(data\.encoding 'utf-8'\)"):
        read_table(p, encoding="utf-8")
    with pytest.raises(DataError, match=r"pt\.csv:3: byte 0xe3 is not valid ascii"):
        read_text(p, encoding="ascii")


@pytest.mark.parametrize("given", ["\t", "\\t", "tab", "TAB"])
def test_delimiter_override_accepts_tab_spellings(tmp_path, given):
    p = tmp_path / "d.csv"
    p.write_text('a,b\tx "y\nc,d\tz\n', encoding="utf-8")
    t = read_table(p, delimiter=given)
    assert t.delimiter == "\t" and [r.values for r in t.rows] == [{"column_0": "a,b", "column_1": 'x "y'},
                                                                  {"column_0": "c,d", "column_1": "z"}]


def test_delimiter_override(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a;b,c;d\ne;f,g;h\n", encoding="utf-8")
    assert read_table(p).delimiter == ";"
    t = read_table(p, delimiter=",")
    assert t.delimiter == "," and [r.values for r in t.rows] == [{"column_0": "a;b", "column_1": "c;d"},
                                                                 {"column_0": "e;f", "column_1": "g;h"}]
    txt = tmp_path / "d.txt"  # would be plain text: a delimiter set means it is delimited
    txt.write_text("1|good film\n0|bad film\n", encoding="utf-8")
    t = read_table(txt, delimiter="|")
    assert (t.format, t.rows[1].values) == ("csv", {"column_0": "0", "column_1": "bad film"})
    with pytest.raises(DataError, match=r"d\.csv: data\.delimiter must be one character"):
        read_table(p, delimiter="ab")
    with pytest.raises(DataError, match=r"d\.csv: unknown format 'xls'"):
        read_table(p, fmt="xls")


# ------------------------------------------------------------------------------------------
# LABEL TEXT


def test_label_text_allows_several_spaces_and_a_missing_text(tmp_path):
    p = tmp_path / "sst"
    p.write_text("1 a gripping film\n0  a dull plot , badly acted\n1 warm and funny\n0 too long\n"
                 "1 great cast\n0 flat\n", encoding="utf-8")
    assert detect_format(p) == "label_text"
    t = read_table(p)
    assert t.format == "label_text" and t.rows[1].values == {"label": "0", "text": "a dull plot , badly acted"}
    q = tmp_path / "gaps"
    q.write_text("1 a gripping film\n0 a dull plot\n1\n0 too long\n1 warm and funny\n0 flat\n", encoding="utf-8")
    assert detect_format(q) == "label_text"
    t = read_table(q)
    assert not t.skipped and [(r.line, r.values["label"], r.values["text"]) for r in t.rows] == [
        (1, "1", "a gripping film"), (2, "0", "a dull plot"), (3, "1", ""), (4, "0", "too long"),
        (5, "1", "warm and funny"), (6, "0", "flat")]
    assert read_table(q, fmt="label_text").rows[2].values == {"label": "1", "text": ""}


def test_a_pandas_written_tsv_with_quoted_fields_reads_right(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"text": ["plain review", "line one of a review\nline two of a review", 'He said "wow" twice',
                                "a\ttab inside", "fine"], "label": ["pos", "neg", "pos", "neg", "pos"]})
    p = tmp_path / "pandas.tsv"
    df.to_csv(p, sep="\t", index=False)
    t = read_table(p)
    assert (t.delimiter, t.quoted, t.header) == ("\t", True, True)
    assert [r.values["text"] for r in t.rows] == list(df["text"]) and len(t.rows) == 5
    assert "quoted fields" in t.describe()
