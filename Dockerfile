# The dashboard as one container: `python app.py` on $PORT (8000), the same command as the
# Procfile. Build: docker build -t ai-dashboard .   Run: see README ("Deploy" > "Docker").
FROM python:3.11-slim

# llama-cpp-python compiles llama.cpp: a portable AVX2 build, as in the Makefile (a native build
# can die with SIGILL on some Xeons). The ledger's SQLite file goes to DATA_DIR: mount a volume.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
    PORT=8000 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    DATA_DIR=/app/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"
CMD ["python", "app.py"]
