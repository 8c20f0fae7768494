# Thin wrapper: dev.py does the work (it needs only Python 3.10+; make is optional).
PYTHON ?= python3

.PHONY: demo test setup
demo:
	$(PYTHON) dev.py demo
test:
	$(PYTHON) dev.py test
setup:
	$(PYTHON) dev.py setup --test
