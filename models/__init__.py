"""Pure model code for streamrec: ids, numpy arrays and tensors in, no IO.

Nothing in this package imports faust, confluent_kafka, aiokafka or redis; the running system in
``stream_app`` feeds it decoded events and writes what it returns.
"""
