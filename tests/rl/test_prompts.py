"""Prompt files and prompt lists written with typographic quotes get a hint towards straight ones."""
from __future__ import annotations

import pytest

from rl.prompts import load_prompt_file
from rl.rewards import PromptError, check_prompts, target_text


def test_curly_quoted_prompt_file_names_the_lines_and_asks_for_straight_quotes(tmp_path):
    path = tmp_path / "curly.txt"
    path.write_text('a sign that says "OPEN"\na sign that says \u201cSTOP\u201d\nno quotes at all\n'
                    'a poster reading \u201eSALE\u201c\n', encoding="utf-8")
    with pytest.raises(PromptError) as caught:
        load_prompt_file(path)
    message = str(caught.value)
    assert message.startswith(f"prompt file {path}: 3 prompt(s) without a double-quoted target text")
    assert "line 2: 'a sign that says \u201cSTOP\u201d'" in message and "line 3: 'no quotes at all'" in message
    # the hint names exactly the lines with typographic quotes, not the one that simply has none
    assert message.endswith('curly/typographic quotes (\u201c\u2026\u201d) found in line 2, line 4: '
                            'the target text must be in straight double quotes ("...")')


def test_straight_quotes_pass_and_a_list_without_curly_quotes_gets_no_hint():
    check_prompts(['a sign that says "OPEN"', 'a neon sign reading "CAFE \u201cLUNA\u201d"'])
    assert target_text('a neon sign reading "CAFE \u201cLUNA\u201d"') == "CAFE \u201cLUNA\u201d"
    with pytest.raises(PromptError, match=r"1 prompt\(s\) without a double-quoted target text: #1: 'plain'$"):
        check_prompts(['a sign that says "OPEN"', "plain"])


def test_single_prompt_with_curly_quotes_gets_the_hint():
    with pytest.raises(PromptError, match=r"found in it: the target text must be in straight double quotes"):
        target_text("a sign that says \u00abEXIT\u00bb")
    with pytest.raises(PromptError, match=r"^prompt 'a sign' has no non-empty double-quoted target text "
                                          r"\(e\.g\. a sign that says \"OPEN\"\)$"):
        target_text("a sign")
