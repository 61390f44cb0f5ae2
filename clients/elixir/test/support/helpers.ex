defmodule SseGateway.TestSupport.Helpers do
  @moduledoc "Reads the gateway directly (not through the client) to check what it stored."

  alias SseGateway.SSE

  @doc "Settings for a call to `url`."
  def cfg(url, extra \\ []), do: SseGateway.Config.get([url: url, mode: :sync] ++ extra)

  @doc "`%{topic => count}` from `GET /topics`."
  def counts(url) do
    {:ok, 200, %{"topics" => topics}, _} = SseGateway.HTTP.get("/topics", cfg(url))
    Map.new(topics, &{&1["topic"], &1["count"]})
  end

  @doc """
  The first `n` events of a stream (`path` with its query) as raw blocks
  `%{id, event, data}` (`data` the exact bytes of the `data:` line), read
  over HTTP/1.0 so the body is plain bytes, not chunked.
  """
  def raw_events(url, path, n, timeout \\ 5_000) do
    %URI{port: port} = URI.parse(url)
    {:ok, sock} = :gen_tcp.connect({127, 0, 0, 1}, port, [:binary, active: false])

    :ok =
      :gen_tcp.send(
        sock,
        "GET #{path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
      )

    deadline = System.monotonic_time(:millisecond) + timeout
    result = read(sock, "", nil, SSE.new(), [], n, deadline)
    :gen_tcp.close(sock)
    result
  end

  defp read(_sock, _raw, _body?, _p, acc, n, _deadline) when length(acc) >= n,
    do: acc |> Enum.reverse() |> Enum.take(n)

  defp read(sock, raw, body?, p, acc, n, deadline) do
    left = deadline - System.monotonic_time(:millisecond)

    case :gen_tcp.recv(sock, 0, max(left, 0)) do
      {:ok, data} ->
        {bytes, raw, body?} =
          if body? do
            {data, raw, true}
          else
            buf = raw <> data

            case :binary.split(buf, "\r\n\r\n") do
              [_head, rest] -> {rest, "", true}
              [_] -> {"", buf, false}
            end
          end

        {items, p} = SSE.feed(p, bytes)
        events = for {:event, e} <- items, do: e
        read(sock, raw, body?, p, Enum.reverse(events, acc), n, deadline)

      {:error, reason} ->
        raise "stream #{inspect(reason)} after #{length(acc)} of #{n} events"
    end
  end

  @doc "Collects `{:projects, ...}`/`{:sse_gateway, ...}` messages until `n` arrived or `timeout`."
  def collect(n, timeout \\ 5_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    collect(n, deadline, [])
  end

  defp collect(0, _deadline, acc), do: Enum.reverse(acc)

  defp collect(n, deadline, acc) do
    left = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {:projects, _, _} = m -> collect(n - 1, deadline, [m | acc])
      {:sse_gateway, _, _} = m -> collect(n - 1, deadline, [m | acc])
    after
      left -> Enum.reverse(acc)
    end
  end

  @doc "Polls `fun` until it returns truthy or `timeout` passes; returns its last value."
  def eventually(fun, timeout \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    poll(fun, deadline)
  end

  defp poll(fun, deadline) do
    case fun.() do
      v when v in [nil, false] ->
        if System.monotonic_time(:millisecond) > deadline do
          v
        else
          Process.sleep(50)
          poll(fun, deadline)
        end

      v ->
        v
    end
  end
end
