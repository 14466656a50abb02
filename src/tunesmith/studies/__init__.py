"""Human rating studies: base vs tuned outputs rated blind in the browser, an LLM judge checked
against the raters, and the statistics that say who won and how sure that is.

``create`` builds a study folder from finished runs, ``store`` keeps the ratings (SQLite), ``web`` is
the raters' app, ``judge`` asks an OpenAI-compatible model, ``analysis``/``stats`` compute the
results, ``report`` writes them as HTML, ``export`` writes preference pairs (prompt/chosen/rejected).
"""

from tunesmith.studies.create import Criterion, StudyError, create_study, criteria_from, invite, load_study

__all__ = ["Criterion", "StudyError", "create_study", "criteria_from", "invite", "load_study"]
