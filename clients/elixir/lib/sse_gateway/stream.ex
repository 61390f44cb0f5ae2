defmodule SseGateway.Stream do
  @moduledoc """
  One subscription: a process that holds one SSE connection to the gateway for
  one subscriber process and set of topics, and turns events into messages.

  It speaks HTTP/1.1 itself over `:gen_tcp` (`:ssl` for `https`) rather than
  `:httpc`: it sees a closed or silent socket at once (an idle timer, reset by
  every byte, keepalives included), sends `Last-Event-ID` on every reconnect,
  and holds no connection of an `:httpc` pool for the life of the stream.

  Messages to the subscriber:

  - `format: :projects` — `{:projects, event, payload}`, as
    `PhoenixKitProjects.PubSub` sends them: `event` is an existing atom
    (`String.to_existing_atom/1`), else the string (no atom is ever made from
    the network); `payload` is the decoded data, maps with string keys.
  - `format: :event` — `{:sse_gateway, :event, %SseGateway.Event{}}`.
  - Always: `{:sse_gateway, :reset, info}` on an `event: reset` (history the
    subscriber needed is gone, or its resume id was unusable: refetch state).
    `info` is `%{reason: :retention | :unknown_id | String.t(), requested:,
    oldest:, id:, topics:}`.

  Reconnects after the server's `retry:` when a stream ends, and with
  exponential backoff (up to `reconnect_max`, jittered) while connecting fails,
  resuming from the last id seen: nothing is missed or repeated across dropped
  connections and gateway restarts. The last id is also kept in an ETS table so
  a restart of this process (it is `:transient`) resumes too.
  """

  use GenServer, restart: :transient
  require Logger

  alias SseGateway.{Config, Error, Event, JSON, SSE}

  @table __MODULE__
  @max_head 65_536
  @max_line 64 * 1024 * 1024

  # ------------------------------------------------------------------ API

  @doc false
  def child_spec(opts) do
    %{
      id: {__MODULE__, opts[:subscriber], opts[:topics]},
      start: {__MODULE__, :start_link, [opts]},
      restart: :transient
    }
  end

  @doc false
  def start_link(opts) do
    name = {:via, Registry, {SseGateway.Registry, {opts[:subscriber], opts[:topics]}}}
    GenServer.start_link(__MODULE__, opts, name: name)
  end

  @doc false
  def table, do: @table

  @doc "Waits until the stream is subscribed (its first block arrived)."
  def await(pid, timeout), do: GenServer.call(pid, :await, timeout)

  @doc "The last id this stream has seen (for tests and diagnostics)."
  def last_id(pid), do: GenServer.call(pid, :last_id)

  # ------------------------------------------------------------ callbacks

  @impl true
  def init(opts) do
    sub = Keyword.fetch!(opts, :subscriber)
    topics = Keyword.fetch!(opts, :topics)
    cfg = Keyword.fetch!(opts, :cfg)
    key = {sub, topics}

    last_id =
      case :ets.lookup(@table, key) do
        [{_, id}] -> id
        [] -> Keyword.get(opts, :last_event_id)
      end

    state = %{
      key: key,
      sub: sub,
      mref: Process.monitor(sub),
      topics: topics,
      format: Keyword.get(opts, :format, :event),
      cfg: cfg,
      last_id: last_id,
      retry_ms: 2_000,
      failures: 0,
      ready?: false,
      waiters: [],
      sock: nil,
      transport: nil,
      phase: :closed,
      raw: "",
      status: nil,
      chunked?: false,
      chunk: :size,
      parser: SSE.new(),
      idle: nil,
      last_rx: 0,
      error_body: ""
    }

    {:ok, state, {:continue, :connect}}
  end

  @impl true
  def handle_continue(:connect, state), do: {:noreply, connect(state)}

  @impl true
  def handle_call(:await, _from, %{ready?: true} = s), do: {:reply, :ok, s}
  def handle_call(:await, from, s), do: {:noreply, %{s | waiters: [from | s.waiters]}}
  def handle_call(:last_id, _from, s), do: {:reply, s.last_id, s}

  @impl true
  def handle_info(:connect, s), do: {:noreply, connect(s)}

  def handle_info({tag, sock, data}, %{sock: sock} = s) when tag in [:tcp, :ssl] do
    s = touch(s)
    active_once(s)
    received(data, s)
  end

  def handle_info({tag, sock}, %{sock: sock} = s) when tag in [:tcp_closed, :ssl_closed] do
    {:noreply, ended(s, :closed)}
  end

  def handle_info({tag, sock, reason}, %{sock: sock} = s) when tag in [:tcp_error, :ssl_error] do
    {:noreply, ended(s, {:error, reason})}
  end

  def handle_info({:idle, ref}, %{idle: ref} = s) do
    quiet = now() - s.last_rx

    if quiet >= s.cfg.idle_timeout do
      Logger.info("sse_gateway: stream #{inspect(s.topics)} silent too long; reconnecting")
      {:noreply, ended(s, :idle)}
    else
      {:noreply, arm_idle(s, s.cfg.idle_timeout - quiet)}
    end
  end

  def handle_info(:stop_refused, s), do: {:stop, :normal, s}

  def handle_info({:DOWN, ref, :process, _, _}, %{mref: ref} = s), do: {:stop, :normal, s}
  def handle_info(_stale, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, s) do
    close(s)
    :ets.delete(@table, s.key)
    :ok
  end

  # ---------------------------------------------------------- connection

  defp connect(s) do
    s = close(s)
    uri = URI.parse(s.cfg.url)
    host = String.to_charlist(uri.host || "127.0.0.1")

    {transport, port} =
      if uri.scheme == "https", do: {:ssl, uri.port || 443}, else: {:gen_tcp, uri.port || 80}

    opts = [:binary, active: false, packet: :raw, nodelay: true]

    opts =
      if transport == :ssl do
        {:ok, _} = Application.ensure_all_started(:ssl)
        opts ++ Config.ssl_opts(s.cfg, host)
      else
        opts
      end

    with {:ok, sock} <- transport.connect(host, port, opts, s.cfg.connect_timeout),
         :ok <- transport.send(sock, request(s, uri)) do
      s = %{
        s
        | sock: sock,
          transport: transport,
          phase: :head,
          raw: "",
          parser: SSE.new(),
          chunk: :size
      }

      active_once(s)
      touch(s)
    else
      {:error, reason} ->
        failed(s, %Error{
          code: "connection_failed",
          message: "cannot open the stream: #{inspect(reason)}",
          reason: reason
        })
    end
  end

  defp request(s, uri) do
    prefix = String.trim_trailing(uri.path || "", "/")

    path =
      case s.topics do
        [topic] -> "/topics/" <> URI.encode(topic, &URI.char_unreserved?/1)
        topics -> "/events?" <> URI.encode_query(Enum.map(topics, &{"topic", &1}))
      end

    host = if uri.port in [80, 443, nil], do: uri.host, else: "#{uri.host}:#{uri.port}"

    headers =
      [
        {"Host", host},
        {"Accept", "text/event-stream"},
        {"Cache-Control", "no-store"},
        {"User-Agent", "sse_gateway-elixir"},
        {"Connection", "close"}
      ] ++
        if(s.last_id, do: [{"Last-Event-ID", s.last_id}], else: []) ++
        case Config.token(s.cfg) do
          nil -> []
          token -> [{"Authorization", "Bearer " <> token}]
        end

    [
      "GET ",
      prefix,
      path,
      " HTTP/1.1\r\n",
      Enum.map(headers, fn {k, v} -> [k, ": ", v, "\r\n"] end),
      "\r\n"
    ]
  end

  defp active_once(%{transport: :ssl, sock: sock}), do: :ssl.setopts(sock, active: :once)
  defp active_once(%{sock: sock}), do: :inet.setopts(sock, active: :once)

  # One idle timer per connection, re-armed for the rest of the time when it
  # fires early; every byte only stamps the time.
  defp touch(%{idle: nil} = s), do: arm_idle(%{s | last_rx: now()}, s.cfg.idle_timeout)
  defp touch(s), do: %{s | last_rx: now()}

  defp arm_idle(s, ms) do
    ref = make_ref()
    Process.send_after(self(), {:idle, ref}, ms)
    %{s | idle: ref}
  end

  defp now, do: System.monotonic_time(:millisecond)

  defp close(%{sock: nil} = s), do: s

  defp close(s) do
    s.transport.close(s.sock)
    %{s | sock: nil, phase: :closed, idle: nil}
  end

  # The stream ended (closed, error, silence, end of body): reconnect.
  defp ended(s, why) do
    was_streaming = s.phase == :body and s.status == 200
    s = close(s)

    cond do
      was_streaming ->
        schedule(%{s | failures: 0}, jitter(s.retry_ms))

      s.status && s.status != 200 ->
        answered(s)

      true ->
        failed(s, %Error{
          code: "connection_failed",
          message: "the stream ended before its head: #{inspect(why)}",
          reason: why
        })
    end
  end

  defp failed(s, %Error{} = err) do
    n = s.failures
    delay = min(s.cfg.reconnect_max, s.retry_ms * Integer.pow(2, min(n, 16)))

    if n == 0,
      do:
        Logger.warning(
          "sse_gateway: stream #{inspect(s.topics)}: #{Exception.message(err)}; retrying"
        )

    schedule(%{s | failures: n + 1, status: nil}, jitter(delay))
  end

  defp schedule(s, delay) do
    Process.send_after(self(), :connect, delay)
    %{s | status: nil}
  end

  defp jitter(ms), do: ms + :rand.uniform(max(div(ms, 10), 1))

  # ------------------------------------------------------------- receive

  defp received(data, %{phase: :head} = s) do
    raw = s.raw <> data

    case :binary.match(raw, "\r\n\r\n") do
      :nomatch when byte_size(raw) > @max_head ->
        {:noreply, ended(s, :head_too_large)}

      :nomatch ->
        {:noreply, %{s | raw: raw}}

      {pos, 4} ->
        head = binary_part(raw, 0, pos)
        rest = binary_part(raw, pos + 4, byte_size(raw) - pos - 4)

        case parse_head(head) do
          {:ok, status, headers} ->
            chunked? =
              String.contains?(
                String.downcase(Map.get(headers, "transfer-encoding", "")),
                "chunked"
              )

            s = %{
              s
              | phase: :body,
                status: status,
                chunked?: chunked?,
                raw: "",
                chunk: :size,
                error_body: ""
            }

            received(rest, s)

          :error ->
            {:noreply, ended(%{s | status: nil}, :bad_head)}
        end
    end
  end

  defp received(data, %{phase: :body} = s) do
    case body_bytes(s.raw <> data, s) do
      {:ok, bytes, raw, chunk} ->
        s = %{s | raw: raw, chunk: chunk}

        s =
          if s.status == 200,
            do: feed(bytes, s),
            else: %{
              s
              | error_body:
                  binary_part(
                    s.error_body <> IO.iodata_to_binary(bytes),
                    0,
                    min(byte_size(s.error_body) + IO.iodata_length(bytes), 65_536)
                  )
            }

        cond do
          chunk == :done -> {:noreply, ended(s, :end_of_body)}
          # A line longer than any event the gateway could send.
          byte_size(s.parser.buf) > @max_line -> {:noreply, ended(s, :line_too_long)}
          true -> {:noreply, s}
        end

      :error ->
        {:noreply, ended(s, :bad_chunking)}
    end
  end

  defp received(_data, s), do: {:noreply, s}

  defp parse_head(head) do
    [status_line | lines] = String.split(head, "\r\n")

    with ["HTTP/1." <> _, code | _] <- String.split(status_line, " ", parts: 3),
         {status, ""} <- Integer.parse(code) do
      headers =
        for line <- lines, [k, v] <- [String.split(line, ":", parts: 2)], into: %{} do
          {String.downcase(String.trim(k)), String.trim(v)}
        end

      {:ok, status, headers}
    else
      _ -> :error
    end
  end

  defp body_bytes(buf, %{chunked?: false}), do: {:ok, buf, "", :raw}
  defp body_bytes(buf, s), do: dechunk(buf, s.chunk, [])

  # Transfer-Encoding: chunked, one state at a time.
  defp dechunk(buf, :size, out) do
    case :binary.match(buf, "\r\n") do
      :nomatch ->
        if byte_size(buf) > 1024, do: :error, else: {:ok, out, buf, :size}

      {pos, 2} ->
        line = binary_part(buf, 0, pos)
        rest = binary_part(buf, pos + 2, byte_size(buf) - pos - 2)
        hex = line |> String.split(";") |> hd() |> String.trim()

        case Integer.parse(hex, 16) do
          {0, ""} -> {:ok, out, rest, :done}
          {n, ""} when n > 0 -> dechunk(rest, {:data, n}, out)
          _ -> :error
        end
    end
  end

  defp dechunk(buf, {:data, n}, out) do
    if byte_size(buf) >= n do
      <<d::binary-size(n), rest::binary>> = buf
      dechunk(rest, :crlf, [out, d])
    else
      {:ok, [out, buf], "", {:data, n - byte_size(buf)}}
    end
  end

  defp dechunk(<<"\r\n", rest::binary>>, :crlf, out), do: dechunk(rest, :size, out)
  defp dechunk(buf, :crlf, out) when buf in ["", "\r"], do: {:ok, out, buf, :crlf}
  defp dechunk(_, :crlf, _), do: :error
  defp dechunk(buf, :done, out), do: {:ok, out, buf, :done}

  # A non-200 answer, read to its end.
  defp answered(s) do
    err =
      case JSON.decode(s.error_body) do
        {:ok, %{"error" => %{"code" => c, "message" => m}}} ->
          %Error{status: s.status, code: c, message: m}

        _ ->
          %Error{status: s.status, code: "http_#{s.status}", message: "the stream was refused"}
      end

    if s.status in [400, 404] or (not s.ready? and s.status in [401, 403]) do
      # Nothing to reconnect to: tell a waiting subscribe/1, log, stop.
      Logger.error("sse_gateway: stream #{inspect(s.topics)} refused: #{Exception.message(err)}")
      Enum.each(s.waiters, &GenServer.reply(&1, {:error, err}))
      send(self(), :stop_refused)
      %{s | waiters: [], phase: :refused}
    else
      failed(s, err)
    end
  end

  defp feed(bytes, s) do
    {items, parser} = SSE.feed(s.parser, IO.iodata_to_binary(bytes))
    Enum.reduce(items, %{s | parser: parser}, &item/2)
  end

  defp item({:retry, ms}, s), do: %{s | retry_ms: ms}
  defp item({:id, id}, s), do: s |> seen(id) |> ready()

  defp item({:event, %{event: "reset"} = ev}, s) do
    info =
      case JSON.decode(ev.data) do
        {:ok, %{} = d} -> d
        _ -> %{}
      end

    reason =
      case info["reason"] do
        "retention" -> :retention
        "unknown_id" -> :unknown_id
        other -> other
      end

    send(
      s.sub,
      {:sse_gateway, :reset,
       %{
         reason: reason,
         requested: info["requested"],
         oldest: info["oldest"],
         id: ev.id,
         topics: s.topics
       }}
    )

    s |> seen(ev.id) |> ready()
  end

  defp item({:event, ev}, s) do
    data =
      case JSON.decode(ev.data) do
        {:ok, d} -> d
        {:error, _} -> ev.data
      end

    case s.format do
      :projects ->
        send(s.sub, {:projects, event_name(ev.event), data})

      :event ->
        send(
          s.sub,
          {:sse_gateway, :event, %Event{id: ev.id, event: ev.event, data: data, topics: s.topics}}
        )
    end

    s |> seen(ev.id) |> ready()
  end

  defp seen(s, nil), do: s

  defp seen(s, id) do
    :ets.insert(@table, {s.key, id})
    %{s | last_id: id}
  end

  defp ready(%{ready?: true} = s), do: s

  defp ready(s) do
    Enum.each(s.waiters, &GenServer.reply(&1, :ok))
    %{s | ready?: true, waiters: []}
  end

  @doc false
  def event_name(name) do
    String.to_existing_atom(name)
  rescue
    ArgumentError -> name
  end
end
