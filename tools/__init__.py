"""Commands typed once, not while training: building COVIDx v1 from its sources.

    python tools/make_covidx_v1.py --cohen DIR --kermany DIR --covid-net DIR --out DIR
"""
