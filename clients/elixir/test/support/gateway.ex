defmodule SseGateway.TestSupport.Gateway do
  @moduledoc """
  The real `sse-gateway` binary as a child process for the tests: started on
  an ephemeral port with a temporary data dir and a generated config.toml,
  `kill -9`ed, restarted on the same port and data dir, stopped.

  The binary: `SSE_GATEWAY_BIN`, else `$CARGO_TARGET_DIR/debug/sse-gateway`,
  else `../../target/debug/sse-gateway` from this project.
  """

  use GenServer

  def bin do
    here = Path.expand("../..", __DIR__)

    candidates =
      [
        System.get_env("SSE_GATEWAY_BIN"),
        System.get_env("CARGO_TARGET_DIR") &&
          Path.join(System.get_env("CARGO_TARGET_DIR"), "debug/sse-gateway"),
        Path.join(here, "../../target/debug/sse-gateway")
      ]
      |> Enum.reject(&is_nil/1)

    Enum.find(candidates, &File.exists?/1) ||
      raise "sse-gateway binary not found (tried #{inspect(candidates)}); build it with " <>
              "`cargo build --bin sse-gateway` or set SSE_GATEWAY_BIN"
  end

  # Runs the binary under a shell that kills it when the test VM goes away
  # without cleaning up (its end of our stdin closes): no orphans after an
  # interrupted `mix test`. Prints the binary's pid first, for kill -9.
  @guard """
  exec 3<&0
  "$@" <&- &
  pid=$!
  echo "sse-gateway-pid $pid"
  (read _ <&3; kill -9 "$pid") >/dev/null 2>&1 &
  wait "$pid"
  """

  defp await_pid(port) do
    receive do
      {^port, {:data, {_, "sse-gateway-pid " <> pid}}} -> String.to_integer(pid)
    after
      5_000 -> raise "the gateway's wrapper printed no pid"
    end
  end

  @doc """
  Starts a gateway. Options: `config:` extra TOML appended to the generated
  file (sections `[stream]`, `[retention]`, … are written by this module
  from `retry_ms:`, `heartbeat_ms:`, `retention:` keyword options),
  `data_dir:`.
  """
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :id, __MODULE__),
      start: {__MODULE__, :start_link, [opts]},
      shutdown: 5_000
    }
  end

  def url(gw), do: GenServer.call(gw, :url)
  def port(gw), do: GenServer.call(gw, :port)
  def log(gw), do: GenServer.call(gw, :log)

  @doc "SIGKILL: no flush, no goodbye."
  def kill9(gw), do: GenServer.call(gw, :kill9, 15_000)

  @doc "Starts the binary again on the same port and data dir."
  def restart(gw), do: GenServer.call(gw, :restart, 30_000)

  # ---------------------------------------------------------------- server

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    dir = Path.join(System.tmp_dir!(), "sse-gateway-ex-#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    data_dir = Keyword.get(opts, :data_dir, Path.join(dir, "data"))
    config = Path.join(dir, "config.toml")
    File.write!(config, toml(opts, data_dir))

    s = %{
      dir: dir,
      config: config,
      data_dir: data_dir,
      port: nil,
      os_pid: nil,
      port_num: 0,
      log: []
    }

    {:ok, boot(s, 0)}
  end

  defp toml(opts, data_dir) do
    retention = Keyword.get(opts, :retention, [])

    """
    [server]
    listen = "127.0.0.1:0"
    drain_timeout_ms = 1000

    [storage]
    backend = "sled"
    data_dir = "#{data_dir}"

    [stream]
    retry_ms = #{Keyword.get(opts, :retry_ms, 100)}
    heartbeat_ms = #{Keyword.get(opts, :heartbeat_ms, 1000)}

    [retention]
    max_events_per_topic = #{Keyword.get(retention, :max_events_per_topic, 100_000)}
    trim_interval_ms = #{Keyword.get(retention, :trim_interval_ms, 1000)}

    #{Keyword.get(opts, :config, "")}
    """
  end

  defp boot(s, attempt) do
    listen = "127.0.0.1:#{s.port_num}"

    port =
      Port.open({:spawn_executable, "/bin/sh"}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 8192},
        args:
          ["-c", @guard, "sh", bin()] ++
            ["serve", "--config", s.config, "--listen", listen, "--data-dir", s.data_dir],
        env: [{~c"RUST_LOG", ~c"info"}, {~c"NO_COLOR", ~c"1"}]
      ])

    os_pid = await_pid(port)
    s = %{s | port: port, os_pid: os_pid}

    case await_listening(s, System.monotonic_time(:millisecond) + 30_000) do
      {:ok, num, s} ->
        %{s | port_num: num}

      {:exited, s} when attempt < 50 ->
        # The port may still be held by the process just killed.
        Process.sleep(100)
        boot(s, attempt + 1)

      {_, s} ->
        raise "gateway did not start: #{Enum.join(Enum.reverse(s.log), "\n")}"
    end
  end

  defp await_listening(s, deadline) do
    port = s.port

    receive do
      {^port, {:data, {_, line}}} ->
        s = %{s | log: [line | s.log]}

        case Regex.run(~r/listening on http:\/\/127\.0\.0\.1:(\d+)/, line) do
          [_, num] -> {:ok, String.to_integer(num), s}
          nil -> await_listening(s, deadline)
        end

      {^port, {:exit_status, _}} ->
        {:exited, %{s | port: nil, os_pid: nil}}
    after
      max(deadline - System.monotonic_time(:millisecond), 0) ->
        kill(s)
        {:timeout, s}
    end
  end

  @impl true
  def handle_call(:url, _, s), do: {:reply, "http://127.0.0.1:#{s.port_num}", s}
  def handle_call(:port, _, s), do: {:reply, s.port_num, s}
  def handle_call(:log, _, s), do: {:reply, Enum.reverse(s.log), s}
  def handle_call(:kill9, _, s), do: {:reply, :ok, kill(s)}
  def handle_call(:restart, _, s), do: {:reply, :ok, boot(kill(s), 0)}

  @impl true
  def handle_info({port, {:data, {_, line}}}, %{port: port} = s),
    do: {:noreply, %{s | log: [line | s.log]}}

  def handle_info({port, {:exit_status, _}}, %{port: port} = s),
    do: {:noreply, %{s | port: nil, os_pid: nil}}

  def handle_info(_, s), do: {:noreply, s}

  @impl true
  def terminate(_, s) do
    kill(s)
    File.rm_rf(s.dir)
  end

  defp kill(%{os_pid: nil} = s), do: s

  defp kill(s) do
    System.cmd("kill", ["-9", Integer.to_string(s.os_pid)], stderr_to_stdout: true)
    port = s.port

    receive do
      {^port, {:exit_status, _}} -> :ok
    after
      5_000 -> :ok
    end

    %{s | port: nil, os_pid: nil}
  end
end
