"""Partition tests of the scale-out mode (issue 21): namespace test bed, nemesis, workloads, checkers."""
