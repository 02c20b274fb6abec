"""Dead letters ops can act on: list, show and redrive the records of the dead-letter topic.

``model.py`` is the pure part (a dead letter as plain data, filters, the summary, what a redrive sends and at
what pace); ``reader.py`` reads the topic and fetches originals (Kafka), ``state.py`` keeps a redrive's record
of what it sent (Redis), ``redrive.py`` runs one, ``http.py`` serves it on the admin API.
"""
