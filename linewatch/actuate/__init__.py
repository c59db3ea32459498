"""`linewatch actuate`: the reject component (docs/line.md).

gate.py is the timing rule, pure bookkeeping on an injected clock; outputs.py puts rejects on
the PLC (Modbus/TCP, OPC UA) or in the log; service.py runs the three threads (verdict socket ->
decision core -> output) and the metrics.
"""
