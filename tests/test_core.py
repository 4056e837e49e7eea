"""The tests once here moved to files named by behaviour (issue 29):
test_step_size.py, test_records.py, test_sections.py, test_state.py,
test_bad_input.py and test_compiled_step.py.

Kept only for `from tests.test_core import aov_tables` (test_aov_rules.py).
"""

from tests.test_sections import aov_tables  # noqa: F401
