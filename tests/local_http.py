"""A local HTTP server on a free port for the teacher tests (an OpenAI-style endpoint each)."""

import http.server


class Server(http.server.ThreadingHTTPServer):
  """Serves `handler` on 127.0.0.1 at a free port, one daemon thread a request."""

  daemon_threads = True

  def __init__(self, handler):
    super().__init__(("127.0.0.1", 0), handler)

  @property
  def url(self):
    return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
  """Quiet (no access log); `send_json` replies with a JSON body."""

  def log_message(self, *args):
    pass

  def send_json(self, code: int, data: bytes, length: int | None = None) -> None:
    """Status `code` and `data` as the body; `length` declares another Content-Length."""
    self.send_response(code)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data) if length is None else length))
    self.end_headers()
    self.wfile.write(data)
