"""The README's catalogue of bad input and faults: every row names tests that exist."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rows():
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('<!-- catalogue:start -->')[1].split('<!-- catalogue:end -->')[0]
  return [line for line in section.splitlines()
          if line.startswith('|') and not line.startswith(('| input or fault', '|---'))]


def test_catalogue_has_at_least_60_cases_each_naming_a_test():
  rows = _rows()
  assert len(rows) >= 60
  for row in rows:
    cells = [c.strip() for c in row.strip().strip('|').split('|')]
    assert len(cells) == 3 and all(cells), row  # input | what happens | test
    assert re.search(r'tests/\w+\.py::\w+', cells[2]), row


def test_every_named_test_exists():
  missing = []
  for row in _rows():
    for path, name in re.findall(r'(tests/\w+\.py)::(\w+)', row.strip().strip('|').split('|')[-1]):
      source = ROOT / path
      if not source.exists() or not re.search(rf'^\s*def {name}\(', source.read_text(), re.M):
        missing.append(f'{path}::{name}')
  assert not missing, missing
